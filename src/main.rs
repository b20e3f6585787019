//! The `skypostal-proxy` binary: see `skypostal-proxy --help`.

#![forbid(unsafe_code)]

/// mimalloc: the request path allocates small, short-lived buffers, where it measured faster
/// than the system allocator (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    skypostal_proxy::cli::main()
}
