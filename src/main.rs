//! The `skypostal-proxy` binary: see `skypostal-proxy --help`.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    skypostal_proxy::cli::main()
}
