//! Brokers that join the cluster after the proxy started get a listener without a restart; a broker that
//! leaves disturbs nobody else. Runs on its own one-node cluster ("dynamic"), grown to two nodes and back.

use crate::common::*;
use crate::rdkafka_clients::{client_config, produce_values, read_all};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::time::Duration;

/// Creates `topic` with one partition on `replicas` (the first is the preferred leader).
pub(crate) async fn create_on(bootstrap: &str, topic: &str, replicas: &[i32]) {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap).create().unwrap();
    let assignment: &[&[i32]] = &[replicas];
    let res = admin
        .create_topics(
            &[NewTopic::new(
                topic,
                1,
                TopicReplication::Variable(assignment),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap();
    for r in res {
        r.expect("topic created");
    }
}

/// The node leading partition 0 of `topic`, as the cluster's metadata says.
pub(crate) fn leader_of(bootstrap: &str, topic: &str) -> i32 {
    let c: BaseConsumer = client_config(bootstrap).create().unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(20))
        .unwrap();
    md.topics()[0].partitions()[0].leader()
}

fn brokers_seen(bootstrap: &str) -> Vec<(i32, String, i32)> {
    let c: BaseConsumer = client_config(bootstrap).create().unwrap();
    let md = c.fetch_metadata(None, Duration::from_secs(20)).unwrap();
    let mut b: Vec<_> = md
        .brokers()
        .iter()
        .map(|b| (b.id(), b.host().to_string(), b.port()))
        .collect();
    b.sort();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_joining_later_get_listeners_and_leaving_ones_disturb_nobody() {
    let proxy = start_proxy(Cluster::Dynamic).await;
    // Beside it, a proxy routing by SNI on one port: a broker that joins needs no port plan there.
    let (sni, sni_pki) = crate::tls::sni_proxy(Cluster::Dynamic, "sni-dynamic").await;
    let bs = proxy.bootstrap().to_string();
    let shared = proxy.proxy.as_ref().unwrap().shared().clone();
    assert!(shared.brokers.proxy_port(1).is_some());
    assert!(
        shared.brokers.proxy_port(2).is_none(),
        "node 2 does not exist yet"
    );

    let steady = unique_topic("dyn-steady");
    create_on(&bs, &steady, &[1]).await;
    produce_values(
        &bs,
        &steady,
        &(0..50).map(|i| format!("a{i}")).collect::<Vec<_>>(),
        &[],
    )
    .await;

    // A broker joins. The proxy's own metadata refresh (every 2 s here) opens its listener.
    tokio::task::spawn_blocking(|| kafka_script(&["add-broker", "dynamic", "2"]))
        .await
        .unwrap();
    let s = shared.clone();
    eventually("a listener for node 2", Duration::from_secs(30), || {
        let s = s.clone();
        async move { s.brokers.proxy_port(2).is_some() }
    })
    .await;
    let port2 = i32::from(proxy.broker_port(2));
    let b = bs.clone();
    eventually(
        "clients to see node 2 at its proxy address",
        Duration::from_secs(30),
        || {
            let b = b.clone();
            async move {
                tokio::task::spawn_blocking(move || brokers_seen(&b))
                    .await
                    .unwrap()
                    .contains(&(2, PROXY_HOST.to_string(), port2))
            }
        },
    )
    .await;

    // A topic that lives only on the new broker is written and read through its new listener.
    let on_new = unique_topic("dyn-new");
    create_on(&bs, &on_new, &[2]).await;
    let values: Vec<String> = (0..50).map(|i| format!("n{i}")).collect();
    produce_values(&bs, &on_new, &values, &[]).await;
    let got = tokio::task::spawn_blocking({
        let (b, t) = (bs.clone(), on_new.clone());
        move || read_all(&b, &t, "read_uncommitted", 50)
    })
    .await
    .unwrap();
    assert_eq!(got, values);
    // Through the SNI proxy: the new broker is announced under its name on the same port, and that
    // name reaches it (its own metadata refresh taught it, or the answer below does).
    let mut boot = crate::tls::sni_client(&sni, &sni_pki, crate::tls::SNI_BOOTSTRAP)
        .await
        .expect("bootstrap name");
    let md = boot.topic_metadata(&on_new).await;
    let sni_port = sni
        .bootstrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .parse::<i32>()
        .unwrap();
    assert!(
        md.brokers
            .iter()
            .any(|b| b.host.as_str() == crate::tls::sni_broker(2) && b.port == sni_port),
        "node 2 named on the one port: {:?}",
        md.brokers
    );
    let mut node2 = crate::tls::sni_client(&sni, &sni_pki, &crate::tls::sni_broker(2))
        .await
        .expect("node 2 by name");
    let req = crate::producer_state::produce(
        &on_new,
        None,
        vec![(0, crate::producer_state::batch(-1, -1, -1, 1, false, "sni"))],
    );
    assert_eq!(
        crate::producer_state::send_produce(&mut node2, &req).await[0],
        (0, 0, 50, None),
        "written on the new broker through its SNI name"
    );
    drop((boot, node2));
    sni.stop().await;

    // The broker leaves. Traffic to the remaining broker carries on through the same proxy.
    tokio::task::spawn_blocking(|| kafka_script(&["remove-broker", "dynamic", "2"]))
        .await
        .unwrap();
    produce_values(
        &bs,
        &steady,
        &(50..100).map(|i| format!("a{i}")).collect::<Vec<_>>(),
        &[],
    )
    .await;
    let got = tokio::task::spawn_blocking({
        let (b, t) = (bs.clone(), steady.clone());
        move || read_all(&b, &t, "read_uncommitted", 100)
    })
    .await
    .unwrap();
    assert_eq!(got.len(), 100);
    let b = bs.clone();
    eventually(
        "node 2 to leave the metadata",
        Duration::from_secs(60),
        || {
            let b = b.clone();
            async move {
                tokio::task::spawn_blocking(move || brokers_seen(&b))
                    .await
                    .unwrap()
                    .iter()
                    .all(|(id, _, _)| *id != 2)
            }
        },
    )
    .await;
    proxy.stop().await;
}
