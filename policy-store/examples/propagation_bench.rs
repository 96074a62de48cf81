//! Policy propagation benchmark (run by `bench/policy_propagation.sh`).
//!
//! Against a running cluster (endpoints as arguments): `PROXIES` followers — the same
//! [`policy_store::client::follow`] every proxy node runs — spread over the nodes; then `CHANGES`
//! changes applied one after another, each timed from the start of `Apply` until every follower
//! enforces it (p50, p99, max); then apply throughput with 16 concurrent writers.
//!
//!   STORE_ADMIN_TOKEN=... [STORE_READ_TOKEN=...] propagation_bench PROXIES CHANGES ENDPOINT...
//!
//! Changes are applied with the admin token; followers use the read token (default: the admin
//! token).

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use policy_store::client::{PolicyClient, follow};

fn doc(run: u128, n: usize) -> String {
    format!("rules:\n  - name: bench-{run}-{n}\n    match: {{ operations: [drop] }}\n    action: deny\n")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let proxies: usize = args.next().context("PROXIES")?.parse()?;
    let changes: usize = args.next().context("CHANGES")?.parse()?;
    let endpoints: Vec<String> = args.collect();
    ensure!(!endpoints.is_empty(), "usage: propagation_bench PROXIES CHANGES ENDPOINT...");
    let admin = std::env::var("STORE_ADMIN_TOKEN").context("STORE_ADMIN_TOKEN: the store's admin token")?;
    let read = std::env::var("STORE_READ_TOKEN").unwrap_or_else(|_| admin.clone());
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();

    // The nodes may still be starting and electing a leader.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut client, first) = loop {
        let attempt = async {
            let mut c = PolicyClient::connect(&endpoints[0], &admin).await?;
            let v = c.apply(&doc(run, 0), "bench").await?.version;
            anyhow::Ok((c, v))
        };
        match attempt.await {
            Ok(ready) => break ready,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the cluster: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let mut followers: Vec<_> = (0..proxies)
        .map(|i| {
            let mut e = endpoints.clone();
            e.rotate_left(i % endpoints.len());
            follow(e, &read)
        })
        .collect::<Result<_, _>>()?;
    for f in &mut followers {
        tokio::time::timeout(
            Duration::from_secs(10),
            f.policy.wait_for(|p| p.as_ref().is_some_and(|p| p.version >= first)),
        )
        .await
        .context("followers did not start")??;
    }

    let mut latencies = Vec::with_capacity(changes);
    for n in 1..=changes {
        let started = Instant::now();
        let version = client.apply(&doc(run, n), "bench").await?.version;
        for f in &mut followers {
            f.policy.wait_for(|p| p.as_ref().is_some_and(|p| p.version >= version)).await?;
        }
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("apply -> enforced on {proxies} followers, {changes} changes, {} nodes:", endpoints.len());
    println!(
        "  p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms   (target p99 < 200 ms)",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies[latencies.len() - 1])
    );

    let writers = 16;
    let per_writer = changes.max(writers) / writers * 4;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let endpoint = endpoints[w % endpoints.len()].clone();
        let admin = admin.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = PolicyClient::connect(&endpoint, &admin).await?;
            for n in 0..per_writer {
                c.apply(&doc(run, 100_000 + w * 10_000 + n), "bench").await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let total = writers * per_writer;
    let elapsed = started.elapsed();
    println!(
        "apply throughput: {total} changes by {writers} concurrent writers (through every node) in {:.2} s = {:.0} changes/s",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
