//! Benchmarks of the functions on the request path: e-mail parsing, WCF dates, the partner answer
//! mapping, a cache hit, and the shared tier's hashing and sealing. `cargo bench`; CI compiles them (`cargo bench --no-run`).

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};

use criterion::{criterion_group, criterion_main, Criterion};
use skypostal_proxy::cache::{Clock, CredentialsCache};
use skypostal_proxy::config::Settings;
use skypostal_proxy::domain::CustomerEmail;
use skypostal_proxy::partner::wcf_date::parse_wcf_date;
use skypostal_proxy::partner::wire::map_answer;
use skypostal_proxy::partner::SkypostalClient;
use skypostal_proxy::simulator::{customer_record, Simulator, DOCUMENTED_EMAIL, PARTNER_PATH};
use skypostal_proxy::telemetry::RequestId;

fn parsers(c: &mut Criterion) {
    c.bench_function("email_parse_ascii", |b| {
        b.iter(|| CustomerEmail::parse(black_box("John.Doe@Example.com")))
    });
    c.bench_function("email_parse_unicode", |b| {
        b.iter(|| CustomerEmail::parse(black_box(" Élodie.Dupont@Exemple.fr ")))
    });
    c.bench_function("wcf_date", |b| {
        b.iter(|| parse_wcf_date(black_box("/Date(1550761010000-0500)/")))
    });

    let body = serde_json::to_vec(&serde_json::json!([customer_record(DOCUMENTED_EMAIL)]))
        .expect("record serializes");
    let email = CustomerEmail::parse(DOCUMENTED_EMAIL).expect("valid");
    c.bench_function("map_partner_answer", |b| {
        b.iter(|| map_answer(black_box(&body), &email))
    });
}

fn cache_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cache = rt.block_on(async {
        let sim = Simulator::new(396, "1656d700707ad9a77f737e5df3db088a");
        let addr = sim
            .spawn(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("simulator binds");
        let layer = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nallow_anonymous = true\n\
             [upstream]\nbase_url = \"http://{addr}\"\npath = \"{PARTNER_PATH}\"\n"
        );
        let settings = Settings::load(None, Some(&layer)).expect("settings");
        let metrics = std::sync::Arc::new(skypostal_proxy::metrics::Metrics::new());
        let partner = SkypostalClient::new(&settings.upstream, Clock::system(), metrics, None)
            .expect("client");
        let cache = CredentialsCache::new(&settings.cache, partner, Clock::system(), None);
        let email = CustomerEmail::parse(DOCUMENTED_EMAIL).expect("valid");
        let warm = cache
            .get(&email, false, &RequestId::Generated { prefix: 0, n: 0 })
            .await;
        assert!(warm.result.is_ok(), "the cache is warm");
        cache
    });
    let email = CustomerEmail::parse(DOCUMENTED_EMAIL).expect("valid");
    let id = RequestId::Generated { prefix: 0, n: 1 };
    c.bench_function("cache_hit", |b| {
        b.iter(|| rt.block_on(cache.get(black_box(&email), false, &id)))
    });
    c.bench_function("cache_key", |b| b.iter(|| cache.key(black_box(&email))));
}

fn shared_tier(c: &mut Criterion) {
    use skypostal_proxy::config::EncryptionKeys;
    use skypostal_proxy::shared::seal::Sealer;

    let keys = EncryptionKeys::parse("q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=").expect("key");
    let sealer = Sealer::new(&keys);
    let email = CustomerEmail::parse(DOCUMENTED_EMAIL).expect("valid");
    let record = serde_json::to_vec(&customer_record(DOCUMENTED_EMAIL)).expect("record");
    let name = b"skypostal-proxy:v1:AAAAAAAAAAAAAAAAAAAAAA";
    c.bench_function("shared_digest", |b| {
        b.iter(|| sealer.digest(0, black_box(email.as_str())))
    });
    c.bench_function("shared_seal", |b| {
        b.iter(|| sealer.seal(name, black_box(&record)))
    });
    let sealed = sealer.seal(name, &record).expect("sealed");
    c.bench_function("shared_open", |b| {
        b.iter(|| sealer.open(0, name, black_box(&sealed)))
    });
}

criterion_group!(benches, parsers, cache_hit, shared_tier);
criterion_main!(benches);
