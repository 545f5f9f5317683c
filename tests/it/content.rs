//! The content window (issue #15): a batch with the content of one the same client had written on the
//! partition is recognised whatever producer id, epoch or sequence it carries. A client without
//! idempotence that repeats a written batch (its answer was lost) is audited `duplicate_content`, and
//! with `duplicate_content: answer` answered with the original offset instead of written twice;
//! records an idempotent producer re-sends under a new epoch or producer id are reported.

use crate::common::*;
use crate::producer_state::{batch, init_producer_id, produce, send_produce};
use crate::rdkafka_clients::{client_config, create_topic};
use crate::wire::Raw;
use kafka_eos_proxy::audit::{Action, Kind};
use std::time::Duration;

/// The partition's high watermark, asked of the broker directly.
pub(crate) async fn end_offset(topic: &str, partition: i32) -> i64 {
    let (bootstrap, t) = (kafka(Cluster::Single), topic.to_string());
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = client_config(&bootstrap)
            .set("group.id", unique_topic("watermarks"))
            .create()
            .expect("consumer");
        c.fetch_watermarks(&t, partition, Duration::from_secs(20))
            .expect("watermarks")
            .1
    })
    .await
    .expect("watermarks task")
}

const ANSWER: &str = r#"
policies:
  - name: answer-repeats
    match: { topics: { prefix: ["content-answer-"] } }
    produce: { duplicate_content: answer }
  - name: exempt
    match: { topics: { prefix: ["content-exempt-"] } }
    produce: { duplicate_content: allow }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_without_idempotence_is_recognised_by_its_content() {
    let proxy = crate::policies::start_with_policies(ANSWER).await;
    let node = format!("{PROXY_HOST}:{}", proxy.broker_port(1));
    // One record a batch: the test kit's encoder makes one batch per record without a producer id.
    let plain =
        |topic: &str, tag: &str| produce(topic, None, vec![(0, batch(-1, -1, -1, 1, false, tag))]);

    // Default (audit): the repeat, sent on another connection of the same client, is written again
    // and reported with the original offset.
    let audited = unique_topic("content-audit");
    create_topic(&kafka(Cluster::Single), &audited, 1, 1).await;
    let mut first = Raw::connect_as(&node, "app").await;
    assert_eq!(
        send_produce(&mut first, &plain(&audited, "a")).await,
        vec![(0, 0, 0, None)]
    );
    let mut second = Raw::connect_as(&node, "app").await;
    assert_eq!(
        send_produce(&mut second, &plain(&audited, "a")).await[0].2,
        1
    );
    let events = proxy.events(Kind::DuplicateContent);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].action, Action::Forwarded);
    assert_eq!(events[0].original_offset, Some(0));
    assert_eq!(events[0].topic.as_deref(), Some(audited.as_str()));
    // Other content, or the same content from another client, is no repeat.
    assert_eq!(
        send_produce(&mut second, &plain(&audited, "b")).await[0].2,
        2
    );
    let mut other = Raw::connect_as(&node, "other-app").await;
    assert_eq!(
        send_produce(&mut other, &plain(&audited, "a")).await[0].2,
        3
    );
    assert_eq!(proxy.events(Kind::DuplicateContent).len(), 1);

    // duplicate_content: answer: the repeat gets the original offset and nothing is written.
    let answered = unique_topic("content-answer");
    create_topic(&kafka(Cluster::Single), &answered, 1, 1).await;
    assert_eq!(
        send_produce(&mut first, &plain(&answered, "a")).await,
        vec![(0, 0, 0, None)]
    );
    for raw in [&mut first, &mut second] {
        assert_eq!(
            send_produce(raw, &plain(&answered, "a")).await,
            vec![(0, 0, 0, None)],
            "answered with the original offset"
        );
    }
    assert_eq!(end_offset(&answered, 0).await, 1, "written once");
    let events = proxy.events(Kind::DuplicateContent);
    assert_eq!(
        events
            .iter()
            .filter(|e| e.action == Action::Answered)
            .count(),
        2,
        "{events:?}"
    );
    assert_eq!(
        send_produce(&mut first, &plain(&answered, "c")).await[0].2,
        1
    );

    // duplicate_content: allow: the topic is exempt (no audit, written again).
    let exempt = unique_topic("content-exempt");
    create_topic(&kafka(Cluster::Single), &exempt, 1, 1).await;
    let before = proxy.events(Kind::DuplicateContent).len();
    assert_eq!(send_produce(&mut first, &plain(&exempt, "a")).await[0].2, 0);
    assert_eq!(send_produce(&mut first, &plain(&exempt, "a")).await[0].2, 1);
    assert_eq!(proxy.events(Kind::DuplicateContent).len(), before);
    let metrics = proxy.metrics().render();
    assert!(
        metrics.lines().any(|l| {
            l.starts_with(
            "kafka_eos_proxy_producer_duplicate_content_total{action=\"answered\",client_id=\"app\""
        ) && l.ends_with(" 2")
        }),
        "{metrics}"
    );
    proxy.stop().await;
}

/// Records an idempotent producer re-sends under a new epoch or producer id (librdkafka after an
/// epoch bump): reported by default and written again by the broker; with `duplicate_content: answer`
/// answered with the original offset, and the producer's later batches on that partition go upstream
/// with their sequences shifted down by the records answered, so the broker sees no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_re_sent_under_a_new_epoch_or_producer_id_are_reported_or_answered() {
    let proxy = crate::policies::start_with_policies(ANSWER).await;
    let node = format!("{PROXY_HOST}:{}", proxy.broker_port(1));
    let mut raw = Raw::connect_as(&node, "bumper").await;

    // Default (audit): reported, and the broker writes the records again.
    let audited = unique_topic("content-epoch-audit");
    create_topic(&kafka(Cluster::Single), &audited, 1, 1).await;
    let (pid, e) = init_producer_id(&mut raw, None).await;
    let x = |topic: &str, p: i64, epoch: i16| {
        produce(topic, None, vec![(0, batch(p, epoch, 0, 2, false, "x"))])
    };
    assert_eq!(send_produce(&mut raw, &x(&audited, pid, e)).await[0].2, 0);
    // The same producer and epoch repeating its batch is a retry, answered by sequence as before.
    assert_eq!(send_produce(&mut raw, &x(&audited, pid, e)).await[0].2, 0);
    assert!(proxy.events(Kind::DuplicateContent).is_empty());
    assert_eq!(
        send_produce(&mut raw, &x(&audited, pid, e + 1)).await[0].2,
        2
    );
    let events = proxy.events(Kind::DuplicateContent);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (
            events[0].producer_id,
            events[0].producer_epoch,
            events[0].original_offset,
            events[0].action
        ),
        (pid, e + 1, Some(0), Action::Forwarded)
    );

    // `answer`: the repeat under the new epoch is answered with offset 0 and not written; the next
    // batches (sequences 2 and 4 to the client) reach the broker as 0 and 2 of the new epoch.
    let topic = unique_topic("content-answer-epoch");
    create_topic(&kafka(Cluster::Single), &topic, 1, 1).await;
    let (pid, e) = init_producer_id(&mut raw, None).await;
    let next = |p: i64, epoch: i16, seq: i32, tag: &str| {
        produce(&topic, None, vec![(0, batch(p, epoch, seq, 2, false, tag))])
    };
    assert_eq!(
        send_produce(&mut raw, &x(&topic, pid, e)).await,
        vec![(0, 0, 0, None)]
    );
    let frames_before = proxy.upstream_frames.lock().unwrap().len();
    assert_eq!(
        send_produce(&mut raw, &x(&topic, pid, e + 1)).await,
        vec![(0, 0, 0, None)]
    );
    assert_eq!(
        proxy.upstream_frames.lock().unwrap().len(),
        frames_before,
        "answered at the proxy, nothing sent"
    );
    assert_eq!(
        send_produce(&mut raw, &next(pid, e + 1, 2, "y")).await,
        vec![(0, 0, 2, None)]
    );
    // Its retry is answered by sequence (the producer state credits the answered batch too).
    assert_eq!(
        send_produce(&mut raw, &next(pid, e + 1, 2, "y")).await,
        vec![(0, 0, 2, None)]
    );
    assert_eq!(
        send_produce(&mut raw, &next(pid, e + 1, 4, "z")).await,
        vec![(0, 0, 4, None)]
    );
    // A new producer id with the same records: answered too, and its next batch shifted.
    let (pid2, e2) = init_producer_id(&mut raw, None).await;
    assert_ne!(pid2, pid);
    assert_eq!(
        send_produce(&mut raw, &x(&topic, pid2, e2)).await,
        vec![(0, 0, 0, None)]
    );
    assert_eq!(
        send_produce(&mut raw, &next(pid2, e2, 2, "w")).await,
        vec![(0, 0, 6, None)]
    );
    let answered: Vec<_> = proxy
        .events(Kind::DuplicateContent)
        .into_iter()
        .filter(|e| e.action == Action::Answered)
        .map(|e| (e.producer_id, e.producer_epoch, e.original_offset))
        .collect();
    assert_eq!(answered, vec![(pid, e + 1, Some(0)), (pid2, e2, Some(0))]);
    assert_eq!(
        crate::content::end_offset(&topic, 0).await,
        8,
        "x, y, z, w once each"
    );
    let upstream: Vec<(i64, i16, i32)> = proxy.upstream_frames.lock().unwrap()[frames_before..]
        .iter()
        .map(|f| {
            let mut body = f.slice(4..);
            let version = i16::from_be_bytes([f[6], f[7]]);
            use kafka_protocol::protocol::Decodable;
            kafka_protocol::messages::RequestHeader::decode(
                &mut body,
                kafka_protocol::messages::ApiKey::Produce.request_header_version(version),
            )
            .expect("header");
            let req = kafka_protocol::messages::ProduceRequest::decode(&mut body, version)
                .expect("produce");
            let r = req.topic_data[0].partition_data[0]
                .records
                .clone()
                .expect("records");
            let h = kafka_eos_proxy::protocol::batch::BatchHeader::new(&r).expect("a batch");
            assert!(h.crc_ok(), "the CRC follows the new sequence");
            (h.producer_id(), h.producer_epoch(), h.base_sequence())
        })
        .collect();
    assert_eq!(
        upstream,
        vec![(pid, e + 1, 0), (pid, e + 1, 2), (pid2, e2, 0)],
        "y and z shifted down by the two records answered; w the same"
    );
    proxy.stop().await;
}

/// Which Produce answers are lost: the n-th answers (counting from 1) in `lost`; those in `resets`
/// are lost with their connection (it is closed instead of answered).
#[derive(Clone)]
pub(crate) struct LostAnswers {
    lost: Arc<Vec<usize>>,
    resets: Arc<Vec<usize>>,
    seen: Arc<std::sync::atomic::AtomicUsize>,
}

impl LostAnswers {
    pub(crate) fn new(lost: &[usize]) -> LostAnswers {
        LostAnswers::with_resets(lost, &[])
    }

    pub(crate) fn with_resets(lost: &[usize], resets: &[usize]) -> LostAnswers {
        LostAnswers {
            lost: Arc::new(lost.to_vec()),
            resets: Arc::new(resets.to_vec()),
            seen: Arc::default(),
        }
    }

    /// Called for each Produce answer on its way to the client: what happens to it.
    pub(crate) fn next(&self) -> Fault {
        let n = self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if self.lost.contains(&n) {
            Fault::Lose
        } else if self.resets.contains(&n) {
            Fault::Reset
        } else {
            Fault::Pass
        }
    }

    /// Whether the next answer is lost (counting every answer, reset or not).
    pub(crate) fn lose(&self) -> bool {
        self.next() == Fault::Lose
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    Pass,
    Lose,
    Reset,
}

use std::sync::Arc;

/// The relay port is one: the tests that use it take turns.
pub(crate) static RELAY_PORT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The direct path with lost answers: a relay on the single broker's RELAY port (the broker advertises
/// 127.0.0.1:19095 on the listener at 19094, so a client bootstrapped here stays here) that passes every
/// byte both ways but drops the Produce answers `lost` picks, after the broker wrote the batch. Frames
/// are read by their size prefix; requests' correlation ids say which answers are Produce answers.
pub(crate) async fn lossy_relay(lost: LostAnswers) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:19095")
        .await
        .expect("the relay port 19095 (is scripts/bench running?)");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(broker) = tokio::net::TcpStream::connect("127.0.0.1:19094").await else {
                continue;
            };
            let produce_corr: Arc<std::sync::Mutex<std::collections::HashSet<i32>>> =
                Arc::default();
            let (mut cr, mut cw) = client.into_split();
            let (mut br, mut bw) = broker.into_split();
            let ids = produce_corr.clone();
            tokio::spawn(async move {
                loop {
                    let mut size = [0u8; 4];
                    if cr.read_exact(&mut size).await.is_err() {
                        return;
                    }
                    let mut frame = vec![0u8; i32::from_be_bytes(size).max(0) as usize];
                    if cr.read_exact(&mut frame).await.is_err() || frame.len() < 8 {
                        return;
                    }
                    if frame[0..2] == [0, 0] {
                        let corr = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
                        ids.lock().unwrap().insert(corr);
                    }
                    if bw.write_all(&size).await.is_err() || bw.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            });
            let lost = lost.clone();
            tokio::spawn(async move {
                loop {
                    let mut size = [0u8; 4];
                    if br.read_exact(&mut size).await.is_err() {
                        return;
                    }
                    let mut frame = vec![0u8; i32::from_be_bytes(size).max(0) as usize];
                    if br.read_exact(&mut frame).await.is_err() || frame.len() < 4 {
                        return;
                    }
                    let corr = i32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]);
                    let produce = produce_corr.lock().unwrap().remove(&corr);
                    match (produce, produce.then(|| lost.next())) {
                        (true, Some(Fault::Lose)) => continue,
                        // Both directions end: the client sees its connection close.
                        (true, Some(Fault::Reset)) => return,
                        _ => {}
                    }
                    if cw.write_all(&size).await.is_err() || cw.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

/// librdkafka without idempotence writes `rounds` rounds of 20 records, waiting for each round's
/// delivery, with a short request timeout (a lost answer: it disconnects and sends the batch again).
/// Returns the values the topic holds, read directly.
pub(crate) async fn produce_rounds(
    bootstrap: &str,
    topic: &str,
    acks: &str,
    rounds: usize,
) -> Vec<String> {
    let (bs, t, acks) = (bootstrap.to_string(), topic.to_string(), acks.to_string());
    tokio::task::spawn_blocking(move || {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        let producer: ThreadedProducer<DefaultProducerContext> = client_config(&bs)
            .set("enable.idempotence", "false")
            .set("acks", &acks)
            .set("linger.ms", "50")
            .set("socket.timeout.ms", "2000")
            .set("message.timeout.ms", "60000")
            .set("retry.backoff.ms", "100")
            .create()
            .expect("producer");
        for r in 0..rounds {
            for i in 0..20 {
                let value = format!("r{r}-{i}");
                producer
                    .send(BaseRecord::<(), str>::to(&t).payload(&value))
                    .expect("queued");
            }
            producer.flush(Duration::from_secs(60)).expect("delivered");
        }
    })
    .await
    .expect("producer task");
    let (direct, t) = (kafka(Cluster::Single), topic.to_string());
    let total = end_offset(topic, 0).await as usize;
    tokio::task::spawn_blocking(move || {
        crate::rdkafka_clients::read_all(&direct, &t, "read_uncommitted", total)
    })
    .await
    .expect("reader")
}

/// The issue's proof: librdkafka without idempotence, acks=1 and acks=all, loses two Produce answers
/// after the broker wrote the batches. Direct (through a relay that loses them), the retries are written
/// again: the topic holds duplicates. Through the proxy (which read the answers and loses them on the
/// way to the client) with `duplicate_content: answer`, each retry is answered with the original offset:
/// every record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_without_idempotence_loses_answers_duplicates_direct_and_not_through_the_proxy()
{
    kafka(Cluster::Single);
    let _relay_port = RELAY_PORT.lock().await;
    let rounds = 6;
    let expected: std::collections::BTreeSet<String> = (0..rounds)
        .flat_map(|r| (0..20).map(move |i| format!("r{r}-{i}")))
        .collect();
    for acks in ["1", "all"] {
        // Direct.
        let lost = LostAnswers::new(&[2, 5]);
        let relay = lossy_relay(lost.clone()).await;
        let topic = unique_topic("content-direct");
        create_topic(&kafka(Cluster::Single), &topic, 1, 1).await;
        let direct = produce_rounds("127.0.0.1:19095", &topic, acks, rounds).await;
        relay.abort();
        let duplicates = direct.len() - expected.len();
        assert!(
            duplicates > 0,
            "acks={acks}: direct, the retries after lost answers must be written twice"
        );
        assert_eq!(
            direct
                .iter()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>(),
            expected
        );

        // Through the proxy.
        let lost = LostAnswers::new(&[2, 5]);
        let l = lost.clone();
        let rule: DropRule = Arc::new(move |key, _| key == 0 && l.lose());
        let p = crate::policies::policies(ANSWER);
        let proxy =
            start_proxy_full(Cluster::Single, move |c| c.policies = p.clone(), Some(rule)).await;
        let topic = unique_topic("content-answer-rdkafka");
        create_topic(&kafka(Cluster::Single), &topic, 1, 1).await;
        let through = produce_rounds(proxy.bootstrap(), &topic, acks, rounds).await;
        assert_eq!(
            through.len(),
            expected.len(),
            "acks={acks}: through the proxy every record once (direct: {duplicates} duplicates)"
        );
        assert_eq!(
            through
                .iter()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>(),
            expected
        );
        let answered = proxy
            .events(Kind::DuplicateContent)
            .iter()
            .filter(|e| e.action == Action::Answered)
            .count();
        assert_eq!(
            answered, 2,
            "acks={acks}: both retries answered by the proxy"
        );
        eprintln!(
            "acks={acks}: direct {} records for {} sent ({duplicates} duplicates), through the proxy {}",
            direct.len(),
            expected.len(),
            through.len()
        );
        proxy.stop().await;
    }
}

/// kafka-clients 4.4 without idempotence (the `plain-retries` scenario: it sends the very same batch
/// again after a request timeout), acks=1 and acks=all, under `faults` twice: direct through the lossy
/// relay, then through a proxy with `policy` and the same faults inside it (`inside` makes the hooks).
/// Asserts that the direct path duplicated and the proxy wrote every record once, then runs `check` on
/// the proxy. Returns (acks, records direct, records through the proxy).
pub(crate) async fn java_plain_retries(
    faults: impl Fn() -> LostAnswers,
    policy: &str,
    inside: impl Fn(LostAnswers) -> (DropRule, Option<BreakRule>),
    check: impl Fn(&TestProxy, &str),
) -> Vec<(&'static str, usize, usize)> {
    use crate::java_client::run_java_at;
    kafka(Cluster::Single);
    let _relay_port = RELAY_PORT.lock().await;
    let count = |r: &std::collections::BTreeMap<String, Vec<String>>, k: &str| -> usize {
        r[k][0].parse().expect("a count")
    };
    let mut figures = Vec::new();
    for acks in ["1", "all"] {
        let env = [("EOS_ACKS", acks.to_string())];
        let relay = lossy_relay(faults()).await;
        let direct = run_java_at("plain-retries", "127.0.0.1:19095", &env).await;
        relay.abort();
        assert_eq!(count(&direct, "distinct"), 120);
        assert!(
            count(&direct, "records") > 120,
            "acks={acks}: direct, the retries are written twice: {direct:?}"
        );
        let (drop, brk) = inside(faults());
        let p = crate::policies::policies(policy);
        let proxy = start_proxy_faulty(
            Cluster::Single,
            move |c| c.policies = p.clone(),
            Some(drop),
            brk,
        )
        .await;
        let through = crate::java_client::run_java_with("plain-retries", &proxy, &env).await;
        assert_eq!(
            (count(&through, "records"), count(&through, "distinct")),
            (120, 120),
            "acks={acks}: through the proxy every record once (direct: {})",
            count(&direct, "records")
        );
        check(&proxy, acks);
        eprintln!(
            "acks={acks}: Java direct {} records for 120 sent, through the proxy {}",
            count(&direct, "records"),
            count(&through, "records")
        );
        figures.push((acks, count(&direct, "records"), count(&through, "records")));
        proxy.stop().await;
    }
    figures
}

/// The same proof with kafka-clients 4.4: duplicates direct, every record once through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_without_idempotence_loses_answers_duplicates_direct_and_not_through_the_proxy() {
    java_plain_retries(
        || LostAnswers::new(&[2, 5]),
        r#"
policies:
  - name: answer-repeats
    match: { topics: { prefix: ["java-plain-retries"] } }
    produce: { duplicate_content: answer }
"#,
        |lost| {
            let rule: DropRule = Arc::new(move |key, _| key == 0 && lost.lose());
            (rule, None)
        },
        |proxy, acks| {
            let answered = proxy
                .events(Kind::DuplicateContent)
                .iter()
                .filter(|e| e.action == Action::Answered)
                .count();
            assert!(answered >= 2, "acks={acks}: the retries answered");
        },
    )
    .await;
}
