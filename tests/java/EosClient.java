// The Java client (org.apache.kafka:kafka-clients) driven by the integration tests, through the proxy.
//
//   java -cp "<kafka libs>/*:<classes>" EosClient <scenario> <bootstrap> <name-prefix>
//
// Each scenario checks its own outcome and throws (exit code 1) if anything is off; on success it prints
// `RESULT key=value` lines that the Rust test asserts on as well. Scenarios:
//   admin        create a topic, describe it and the cluster; print broker addresses
//   produce      plain produce + consume
//   idempotent   idempotent producer, every record once
//   txn          one committed and one aborted transaction, checked with read_committed
//   ctp          consume-transform-produce with sendOffsetsToTransaction
//   group        two consumers in a group, a rebalance, committed offsets
//   zombie       a transactional producer fenced by a newer instance of its transactional.id: its next
//                write or commit fails with a fatal fencing error (no retry loop), nothing of it is
//                read committed; prints the exception class
//   share        two share consumers (KIP-932 share group) on one topic: every record delivered and
//                acknowledged once between them, through ShareFetch/ShareAcknowledge; prints the
//                addresses the consumers were sent to
//   streams      a Kafka Streams application with processing.guarantee=exactly_once_v2 (classic group
//                protocol): every input record in the output exactly once (read_committed)
//   streams-protocol  the same with group.protocol=streams (KIP-1071: StreamsGroupHeartbeat/Describe)
//   policy       (through a proxy with the test's policy) a non-idempotent producer is refused with
//                PolicyViolationException and writes nothing; a read_uncommitted consumer sees no
//                aborted records
//   refusals     (through a proxy with the refusals policy of tests/it/refusals.rs) each error the proxy
//                answers by itself, met as the library meets the broker's own: a non-idempotent write
//                (44), a gzip batch (76), a transaction timeout above the bound (50), a transactional id
//                another client owns (53). Prints each error's class and how long the client took to
//                give up (it must give up, not retry for ever). Then a new producer id over the rate
//                limit (89, throttled): the client waits for the window and writes
//   plain-retries  a producer without idempotence (acks from EOS_ACKS) writes 6 rounds of 20 records,
//                each round awaited, with a 2 s request timeout: an answer lost after the append makes
//                it disconnect and send the same batch again. Prints how many records the topic holds
//                and how many distinct ones (the test counts the duplicates)
import java.time.Duration;
import java.util.*;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.*;
import org.apache.kafka.clients.consumer.*;
import org.apache.kafka.clients.producer.*;
import org.apache.kafka.common.*;
import org.apache.kafka.common.config.ConfigResource;
import org.apache.kafka.common.serialization.*;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;

public class EosClient {
    static String bootstrap;
    static String prefix;

    public static void main(String[] args) throws Exception {
        if (args.length != 3) throw new IllegalArgumentException("usage: EosClient scenario bootstrap prefix");
        bootstrap = args[1];
        prefix = args[2];
        switch (args[0]) {
            case "admin": admin(); break;
            case "produce": produce(); break;
            case "idempotent": idempotent(); break;
            case "txn": txn(); break;
            case "ctp": ctp(); break;
            case "group": group(); break;
            case "policy": policy(); break;
            case "refusals": refusals(); break;
            case "share": share(); break;
            case "zombie": zombie(); break;
            case "streams": streams("classic"); break;
            case "streams-protocol": streams("streams"); break;
            case "plain-retries": plainRetries(); break;
            default: throw new IllegalArgumentException("unknown scenario " + args[0]);
        }
        System.out.println("RESULT ok=true");
    }

    static void check(boolean cond, String what) {
        if (!cond) throw new AssertionError(what);
    }

    static Properties base() {
        Properties p = new Properties();
        p.put("bootstrap.servers", bootstrap);
        p.put("request.timeout.ms", "20000");
        p.put("default.api.timeout.ms", "60000");
        // TLS to the proxy when the test says so: EOS_TLS_CA (PEM trust store) and, for mTLS,
        // EOS_TLS_KEYSTORE (PEM: the PKCS#8 key, then the certificate).
        String ca = System.getenv("EOS_TLS_CA");
        if (ca != null) {
            p.put("security.protocol", "SSL");
            p.put("ssl.truststore.type", "PEM");
            p.put("ssl.truststore.location", ca);
            String keystore = System.getenv("EOS_TLS_KEYSTORE");
            if (keystore != null) {
                p.put("ssl.keystore.type", "PEM");
                p.put("ssl.keystore.location", keystore);
            }
        }
        // SASL when the test says so: EOS_SASL_MECHANISM (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512),
        // EOS_SASL_USER, EOS_SASL_PASSWORD; over TLS when EOS_TLS_CA is set too (SASL_SSL).
        String mechanism = System.getenv("EOS_SASL_MECHANISM");
        if (mechanism != null) {
            p.put("security.protocol", ca != null ? "SASL_SSL" : "SASL_PLAINTEXT");
            p.put("sasl.mechanism", mechanism);
            String module = mechanism.equals("PLAIN")
                ? "org.apache.kafka.common.security.plain.PlainLoginModule"
                : "org.apache.kafka.common.security.scram.ScramLoginModule";
            p.put("sasl.jaas.config", module + " required username=\"" + System.getenv("EOS_SASL_USER")
                + "\" password=\"" + System.getenv("EOS_SASL_PASSWORD") + "\";");
        }
        return p;
    }

    static Admin admin_client() { return Admin.create(base()); }

    static void createTopic(String topic, int partitions, int rf) throws Exception {
        try (Admin a = admin_client()) {
            a.createTopics(List.of(new NewTopic(topic, partitions, (short) rf))).all().get(60, TimeUnit.SECONDS);
            describe(a, topic, partitions);
        }
    }

    /// A topic just created is known to the controller before every broker has it (each broker applies
    /// the metadata a moment later, and brokers of older releases lag longer): describe it, retrying while
    /// the broker asked does not know it yet, until every partition has a leader.
    static TopicDescription describe(Admin a, String topic, int partitions) throws Exception {
        long deadline = System.currentTimeMillis() + 30_000;
        while (true) {
            try {
                TopicDescription d = a.describeTopics(List.of(topic)).allTopicNames()
                    .get(30, TimeUnit.SECONDS).get(topic);
                if (d.partitions().size() == partitions
                        && d.partitions().stream().allMatch(p -> p.leader() != null && p.leader().id() >= 0)) return d;
            } catch (java.util.concurrent.ExecutionException e) {
                if (!(e.getCause() instanceof org.apache.kafka.common.errors.UnknownTopicOrPartitionException)) throw e;
            }
            if (System.currentTimeMillis() > deadline) throw new AssertionError(topic + " has no leaders after 30 s");
            Thread.sleep(50);
        }
    }

    static KafkaProducer<String, String> producer(Properties extra) {
        Properties p = base();
        p.put("key.serializer", StringSerializer.class.getName());
        p.put("value.serializer", StringSerializer.class.getName());
        p.put("acks", "all");
        p.put("linger.ms", "5");
        p.putAll(extra);
        return new KafkaProducer<>(p);
    }

    static KafkaConsumer<String, String> consumer(String group, String isolation) {
        Properties p = base();
        p.put("key.deserializer", StringDeserializer.class.getName());
        p.put("value.deserializer", StringDeserializer.class.getName());
        p.put("group.id", group);
        p.put("enable.auto.commit", "false");
        p.put("auto.offset.reset", "earliest");
        p.put("isolation.level", isolation);
        return new KafkaConsumer<>(p);
    }

    /** Everything in the topic from the beginning, until `expected` records and the end of every partition. */
    static List<String> readAll(String topic, String isolation, int expected) {
        try (KafkaConsumer<String, String> c = consumer(prefix + "-reader-" + UUID.randomUUID(), isolation)) {
            List<TopicPartition> parts = new ArrayList<>();
            for (PartitionInfo pi : c.partitionsFor(topic)) parts.add(new TopicPartition(topic, pi.partition()));
            c.assign(parts);
            c.seekToBeginning(parts);
            Map<TopicPartition, Long> end = c.endOffsets(parts);
            List<String> out = new ArrayList<>();
            long deadline = System.currentTimeMillis() + 60_000;
            while (System.currentTimeMillis() < deadline) {
                for (ConsumerRecord<String, String> r : c.poll(Duration.ofMillis(200))) out.add(r.value());
                boolean atEnd = true;
                for (TopicPartition tp : parts) atEnd &= c.position(tp) >= end.get(tp);
                if (atEnd && out.size() >= expected) break;
            }
            return out;
        }
    }

    static List<String> numbered(String p, int n) {
        List<String> out = new ArrayList<>();
        for (int i = 0; i < n; i++) out.add(String.format("%s-%05d", p, i));
        return out;
    }

    static void sendAll(KafkaProducer<String, String> p, String topic, List<String> values) throws Exception {
        List<java.util.concurrent.Future<RecordMetadata>> fs = new ArrayList<>();
        for (String v : values) fs.add(p.send(new ProducerRecord<>(topic, v, v)));
        for (var f : fs) f.get(60, TimeUnit.SECONDS);
    }

    static void sameSet(List<String> got, List<String> want, String what) {
        List<String> g = new ArrayList<>(got), w = new ArrayList<>(want);
        Collections.sort(g);
        Collections.sort(w);
        check(g.equals(w), what + ": got " + g.size() + " records, expected " + w.size());
    }

    static void policy() throws Exception {
        String topic = prefix + "-policy";
        createTopic(topic, 2, 1);
        Properties plain = new Properties();
        plain.put("enable.idempotence", "false");
        plain.put("acks", "1");
        plain.put("retries", "0");
        int refused = 0;
        try (KafkaProducer<String, String> p = producer(plain)) {
            for (String v : numbered("jp", 10)) {
                try {
                    p.send(new ProducerRecord<>(topic, v, v)).get(60, TimeUnit.SECONDS);
                } catch (java.util.concurrent.ExecutionException e) {
                    check(e.getCause() instanceof org.apache.kafka.common.errors.PolicyViolationException,
                          "refused with PolicyViolationException, got " + e.getCause());
                    check(e.getCause().getMessage().contains("kafka-eos-proxy policy"),
                          "the error message names the policy: " + e.getCause().getMessage());
                    refused++;
                }
            }
        }
        check(refused == 10, "every non-idempotent write refused, got " + refused);
        try (KafkaProducer<String, String> p = txnProducer(prefix + "-policy-txn")) {
            p.beginTransaction();
            sendAll(p, topic, numbered("jc", 25));
            p.commitTransaction();
            p.beginTransaction();
            sendAll(p, topic, numbered("ja", 10));
            p.abortTransaction();
        }
        List<String> got = readAll(topic, "read_uncommitted", 25);
        sameSet(got, numbered("jc", 25), "a read_uncommitted consumer forced to read_committed");
        System.out.println("RESULT refused=" + refused);
        System.out.println("RESULT consumed=" + got.size());
    }

    /** Runs `op`, which must fail; prints the failure's class (the cause of an ExecutionException) and the
     *  milliseconds until the client gave up. */
    static void refusal(String name, java.util.concurrent.Callable<Object> op) {
        long started = System.nanoTime();
        Throwable failure = null;
        try {
            op.call();
        } catch (Throwable t) {
            failure = t instanceof java.util.concurrent.ExecutionException ? t.getCause() : t;
        }
        long ms = (System.nanoTime() - started) / 1_000_000;
        check(failure != null, name + ": went through");
        // initTransactions wraps the coordinator's error in a KafkaException: name the error itself.
        while (failure.getClass() == KafkaException.class && failure.getCause() != null)
            failure = failure.getCause();
        System.out.println("RESULT " + name + "=" + failure.getClass().getSimpleName());
        System.out.println("RESULT " + name + "_message=" + failure.getMessage());
        System.out.println("RESULT " + name + "_ms=" + ms);
    }

    static void refusals() throws Exception {
        String idem = "refusal-idem-" + prefix, codec = "refusal-codec-" + prefix;
        createTopic(idem, 1, 1);
        createTopic(codec, 1, 1);
        Properties plain = new Properties();
        plain.put("enable.idempotence", "false");
        plain.put("acks", "1");
        try (KafkaProducer<String, String> p = producer(plain)) {
            refusal("idempotence", () -> p.send(new ProducerRecord<>(idem, "k", "v")).get(120, TimeUnit.SECONDS));
        }
        Properties gzip = new Properties();
        gzip.put("compression.type", "gzip");
        String compressible = "compressible ".repeat(100);
        try (KafkaProducer<String, String> p = producer(gzip)) {
            refusal("compression", () -> p.send(new ProducerRecord<>(codec, "k", compressible)).get(120, TimeUnit.SECONDS));
        }
        Properties longTxn = new Properties();
        longTxn.put("transactional.id", prefix + "-long");
        longTxn.put("transaction.timeout.ms", "120000");
        try (KafkaProducer<String, String> p = producer(longTxn)) {
            refusal("transaction_timeout", () -> { p.initTransactions(); return null; });
        }
        Properties foreign = new Properties();
        foreign.put("transactional.id", "refusal-owned-" + prefix);
        foreign.put("transaction.timeout.ms", "30000");
        try (KafkaProducer<String, String> p = producer(foreign)) {
            refusal("owner", () -> { p.initTransactions(); return null; });
        }
        // The idempotent producer of the compression step took this address's one new producer id of
        // the minute: the next one is throttled (89 with the time left) until the minute has room.
        long started = System.nanoTime();
        Properties patient = new Properties();
        patient.put("delivery.timeout.ms", "240000");
        try (KafkaProducer<String, String> p = producer(patient)) {
            p.send(new ProducerRecord<>(idem, "k", "v")).get(240, TimeUnit.SECONDS);
        }
        System.out.println("RESULT rate=written");
        System.out.println("RESULT rate_ms=" + (System.nanoTime() - started) / 1_000_000);
    }

    static void admin() throws Exception {
        String topic = prefix + "-admin";
        createTopic(topic, 4, 1);
        try (Admin a = admin_client()) {
            TopicDescription d = describe(a, topic, 4);
            check(d.partitions().size() == 4, "4 partitions");
            for (TopicPartitionInfo p : d.partitions())
                System.out.println("RESULT leader=" + p.leader().host() + ":" + p.leader().port());
            for (Node n : a.describeCluster().nodes().get(60, TimeUnit.SECONDS))
                System.out.println("RESULT broker=" + n.id() + "@" + n.host() + ":" + n.port());
            Node controller = a.describeCluster().controller().get(60, TimeUnit.SECONDS);
            System.out.println("RESULT controller=" + controller.host() + ":" + controller.port());
            System.out.println("RESULT partitions=" + d.partitions().size());
        }
    }

    static void produce() throws Exception {
        String topic = prefix + "-plain";
        createTopic(topic, 2, 1);
        List<String> values = numbered("j", 200);
        try (KafkaProducer<String, String> p = producer(new Properties())) { sendAll(p, topic, values); }
        List<String> got = readAll(topic, "read_uncommitted", values.size());
        sameSet(got, values, "plain produce/consume");
        System.out.println("RESULT consumed=" + got.size());
    }

    static void plainRetries() throws Exception {
        String topic = prefix + "-retries";
        createTopic(topic, 1, 1);
        Properties extra = new Properties();
        extra.put("enable.idempotence", "false");
        extra.put("acks", System.getenv().getOrDefault("EOS_ACKS", "all"));
        extra.put("request.timeout.ms", "2000");
        extra.put("delivery.timeout.ms", "60000");
        extra.put("retry.backoff.ms", "100");
        extra.put("max.in.flight.requests.per.connection", "1");
        List<String> sent = new ArrayList<>();
        try (KafkaProducer<String, String> p = producer(extra)) {
            for (int r = 0; r < 6; r++) {
                List<String> round = numbered("jr" + r, 20);
                sendAll(p, topic, round);
                sent.addAll(round);
            }
        }
        List<String> got = readAll(topic, "read_uncommitted", sent.size());
        check(new HashSet<>(got).equals(new HashSet<>(sent)), "every record sent is in the topic");
        System.out.println("RESULT records=" + got.size());
        System.out.println("RESULT distinct=" + new HashSet<>(got).size());
    }

    static void idempotent() throws Exception {
        String topic = prefix + "-idem";
        createTopic(topic, 3, 3);
        Properties extra = new Properties();
        extra.put("enable.idempotence", "true");
        extra.put("max.in.flight.requests.per.connection", "5");
        List<String> values = numbered("ji", 1500);
        try (KafkaProducer<String, String> p = producer(extra)) { sendAll(p, topic, values); }
        List<String> got = readAll(topic, "read_uncommitted", values.size());
        sameSet(got, values, "idempotent produce");
        System.out.println("RESULT consumed=" + got.size());
    }

    static KafkaProducer<String, String> txnProducer(String id) {
        Properties extra = new Properties();
        extra.put("transactional.id", id);
        extra.put("transaction.timeout.ms", "30000");
        KafkaProducer<String, String> p = producer(extra);
        p.initTransactions();
        return p;
    }

    static void txn() throws Exception {
        String topic = prefix + "-txn";
        createTopic(topic, 2, 3);
        try (KafkaProducer<String, String> p = txnProducer(prefix + "-txn-id")) {
            p.beginTransaction();
            sendAll(p, topic, numbered("jc", 25));
            p.commitTransaction();
            p.beginTransaction();
            sendAll(p, topic, numbered("ja", 10));
            p.abortTransaction();
        }
        List<String> committed = readAll(topic, "read_committed", 25);
        sameSet(committed, numbered("jc", 25), "read_committed sees only the committed transaction");
        List<String> all = readAll(topic, "read_uncommitted", 35);
        check(all.size() == 35, "read_uncommitted sees both transactions' records, got " + all.size());
        System.out.println("RESULT committed=" + committed.size());
        System.out.println("RESULT uncommitted=" + all.size());
    }

    static void ctp() throws Exception {
        String in = prefix + "-ctp-in", out = prefix + "-ctp-out", group = prefix + "-ctp-group";
        createTopic(in, 3, 3);
        createTopic(out, 3, 3);
        List<String> values = numbered("jin", 120);
        try (KafkaProducer<String, String> p = producer(new Properties())) { sendAll(p, in, values); }
        int done = 0;
        try (KafkaConsumer<String, String> c = consumer(group, "read_committed");
             KafkaProducer<String, String> p = txnProducer(prefix + "-ctp-txn")) {
            c.subscribe(List.of(in));
            long deadline = System.currentTimeMillis() + 90_000;
            while (done < values.size() && System.currentTimeMillis() < deadline) {
                ConsumerRecords<String, String> recs = c.poll(Duration.ofMillis(500));
                if (recs.isEmpty()) continue;
                p.beginTransaction();
                Map<TopicPartition, OffsetAndMetadata> offsets = new HashMap<>();
                for (ConsumerRecord<String, String> r : recs) {
                    String t = r.value().replace("jin-", "jout-");
                    p.send(new ProducerRecord<>(out, t, t));
                    offsets.put(new TopicPartition(r.topic(), r.partition()), new OffsetAndMetadata(r.offset() + 1));
                    done++;
                }
                p.sendOffsetsToTransaction(offsets, c.groupMetadata());
                p.commitTransaction();
            }
        }
        check(done == values.size(), "consumed every input once, got " + done);
        List<String> expected = new ArrayList<>();
        for (String v : values) expected.add(v.replace("jin-", "jout-"));
        sameSet(readAll(out, "read_committed", expected.size()), expected, "transformed output");
        long committed = 0;
        try (Admin a = admin_client()) {
            for (OffsetAndMetadata o : a.listConsumerGroupOffsets(group).partitionsToOffsetAndMetadata()
                    .get(60, TimeUnit.SECONDS).values()) committed += o.offset();
        }
        check(committed == values.size(), "offsets committed in transactions, got " + committed);
        System.out.println("RESULT transformed=" + done);
        System.out.println("RESULT committed_offsets=" + committed);
    }

    static void group() throws Exception {
        String topic = prefix + "-group", group = prefix + "-group-id";
        createTopic(topic, 6, 3);
        List<String> values = numbered("jg", 600);
        try (KafkaProducer<String, String> p = producer(new Properties())) { sendAll(p, topic, values.subList(0, 300)); }
        Map<String, Integer> seen = new HashMap<>();
        try (KafkaConsumer<String, String> a = consumer(group, "read_uncommitted")) {
            a.subscribe(List.of(topic));
            long deadline = System.currentTimeMillis() + 60_000;
            while (seen.size() < 300 && System.currentTimeMillis() < deadline) {
                for (ConsumerRecord<String, String> r : a.poll(Duration.ofMillis(200))) seen.merge(r.value(), 1, Integer::sum);
                a.commitSync();
            }
            check(seen.size() == 300, "first member read the first half, got " + seen.size());
            try (KafkaConsumer<String, String> b = consumer(group, "read_uncommitted")) {
                b.subscribe(List.of(topic));
                // Both members poll until the rebalance has given each of them partitions.
                deadline = System.currentTimeMillis() + 60_000;
                while ((a.assignment().isEmpty() || b.assignment().isEmpty()
                        || a.assignment().size() + b.assignment().size() != 6)
                        && System.currentTimeMillis() < deadline) {
                    for (ConsumerRecord<String, String> r : a.poll(Duration.ofMillis(100))) seen.merge(r.value(), 1, Integer::sum);
                    a.commitSync();
                    for (ConsumerRecord<String, String> r : b.poll(Duration.ofMillis(100))) seen.merge(r.value(), 1, Integer::sum);
                    b.commitSync();
                }
                check(!a.assignment().isEmpty() && !b.assignment().isEmpty(), "rebalance split the partitions");
                try (KafkaProducer<String, String> p = producer(new Properties())) { sendAll(p, topic, values.subList(300, 600)); }
                int fromB = 0;
                deadline = System.currentTimeMillis() + 90_000;
                while (seen.size() < 600 && System.currentTimeMillis() < deadline) {
                    for (ConsumerRecord<String, String> r : a.poll(Duration.ofMillis(100))) seen.merge(r.value(), 1, Integer::sum);
                    a.commitSync();
                    for (ConsumerRecord<String, String> r : b.poll(Duration.ofMillis(100))) { seen.merge(r.value(), 1, Integer::sum); fromB++; }
                    b.commitSync();
                }
                check(fromB > 0, "second member received records after the rebalance");
                check(a.assignment().size() + b.assignment().size() == 6, "all 6 partitions assigned");
                System.out.println("RESULT from_second_member=" + fromB);
            }
        }
        check(seen.size() == 600, "every record consumed, got " + seen.size());
        for (Map.Entry<String, Integer> e : seen.entrySet()) check(e.getValue() == 1, "consumed twice: " + e.getKey());
        long committed = 0;
        try (Admin ad = admin_client()) {
            for (OffsetAndMetadata o : ad.listConsumerGroupOffsets(group).partitionsToOffsetAndMetadata()
                    .get(60, TimeUnit.SECONDS).values()) committed += o.offset();
        }
        check(committed == 600, "committed offsets cover every record, got " + committed);
        System.out.println("RESULT consumed=" + seen.size());
    }

    static KafkaShareConsumer<String, String> shareConsumer(String group) {
        Properties p = base();
        p.put("key.deserializer", StringDeserializer.class.getName());
        p.put("value.deserializer", StringDeserializer.class.getName());
        p.put("group.id", group);
        return new KafkaShareConsumer<>(p);
    }

    static void share() throws Exception {
        String topic = prefix + "-share", group = prefix + "-share-group";
        createTopic(topic, 3, 3);
        // A share group starts at the latest offset unless told otherwise (a group config).
        try (Admin a = admin_client()) {
            ConfigResource g = new ConfigResource(ConfigResource.Type.GROUP, group);
            a.incrementalAlterConfigs(Map.of(g, List.of(new AlterConfigOp(
                    new ConfigEntry("share.auto.offset.reset", "earliest"), AlterConfigOp.OpType.SET))))
                .all().get(60, TimeUnit.SECONDS);
        }
        List<String> values = numbered("js", 300);
        try (KafkaProducer<String, String> p = producer(new Properties())) { sendAll(p, topic, values); }
        Map<String, Integer> seen = new HashMap<>();
        int fromA = 0, fromB = 0;
        try (KafkaShareConsumer<String, String> a = shareConsumer(group);
             KafkaShareConsumer<String, String> b = shareConsumer(group)) {
            a.subscribe(List.of(topic));
            b.subscribe(List.of(topic));
            long deadline = System.currentTimeMillis() + 90_000;
            while (seen.size() < values.size() && System.currentTimeMillis() < deadline) {
                for (ConsumerRecord<String, String> r : a.poll(Duration.ofMillis(200))) { seen.merge(r.value(), 1, Integer::sum); fromA++; }
                a.commitSync();
                for (ConsumerRecord<String, String> r : b.poll(Duration.ofMillis(200))) { seen.merge(r.value(), 1, Integer::sum); fromB++; }
                b.commitSync();
            }
            // A few more polls: nothing acknowledged may come back.
            for (int i = 0; i < 5; i++) {
                for (ConsumerRecord<String, String> r : a.poll(Duration.ofMillis(200))) seen.merge(r.value(), 1, Integer::sum);
                a.commitSync();
                for (ConsumerRecord<String, String> r : b.poll(Duration.ofMillis(200))) seen.merge(r.value(), 1, Integer::sum);
                b.commitSync();
            }
        }
        check(seen.size() == values.size(), "every record delivered, got " + seen.size());
        for (Map.Entry<String, Integer> e : seen.entrySet()) check(e.getValue() == 1, "delivered twice: " + e.getKey());
        try (Admin a = admin_client()) {
            ShareGroupDescription d = a.describeShareGroups(List.of(group)).all().get(60, TimeUnit.SECONDS).get(group);
            System.out.println("RESULT share_coordinator=" + d.coordinator().host() + ":" + d.coordinator().port());
        }
        System.out.println("RESULT share_delivered=" + seen.size());
        System.out.println("RESULT share_from_first=" + fromA);
        System.out.println("RESULT share_from_second=" + fromB);
    }

    static void streams(String protocol) throws Exception {
        String in = prefix + "-streams-in", out = prefix + "-streams-out";
        createTopic(in, 3, 3);
        createTopic(out, 3, 3);
        List<String> values = numbered("jk", 500);
        try (KafkaProducer<String, String> p = producer(new Properties())) { sendAll(p, in, values); }
        Properties sp = base();
        sp.put(StreamsConfig.APPLICATION_ID_CONFIG, prefix + "-app");
        sp.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        sp.put(StreamsConfig.DEFAULT_KEY_SERDE_CLASS_CONFIG, Serdes.StringSerde.class);
        sp.put(StreamsConfig.DEFAULT_VALUE_SERDE_CLASS_CONFIG, Serdes.StringSerde.class);
        sp.put(StreamsConfig.consumerPrefix(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG), "earliest");
        sp.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, 100);
        sp.put(StreamsConfig.STATE_DIR_CONFIG,
               java.nio.file.Files.createTempDirectory("eos-streams").toString());
        sp.put(StreamsConfig.GROUP_PROTOCOL_CONFIG, protocol);
        StreamsBuilder b = new StreamsBuilder();
        b.<String, String>stream(in).mapValues(v -> v + "-out").to(out);
        List<String> expected = new ArrayList<>();
        for (String v : values) expected.add(v + "-out");
        KafkaStreams ks = new KafkaStreams(b.build(), sp);
        try {
            ks.start();
            List<String> first = readAll(out, "read_committed", values.size());
            check(first.size() >= values.size(), "the application wrote its output, got " + first.size());
        } finally {
            ks.close(Duration.ofSeconds(30));
        }
        // Read everything again once the application has stopped: nothing twice, nothing missing.
        List<String> all = readAll(out, "read_committed", values.size());
        sameSet(all, expected, "exactly once through Kafka Streams (" + protocol + ")");
        System.out.println("RESULT streams_output=" + all.size());
        System.out.println("RESULT streams_state=" + ks.state());
    }

    static void zombie() throws Exception {
        String topic = prefix + "-zombie", id = prefix + "-zombie-id";
        createTopic(topic, 1, 3);
        KafkaProducer<String, String> old = txnProducer(id);
        old.beginTransaction();
        sendAll(old, topic, numbered("zo", 5));
        // A new instance of the same transactional.id fences the old one (and aborts its transaction).
        try (KafkaProducer<String, String> fresh = txnProducer(id)) {
            fresh.beginTransaction();
            sendAll(fresh, topic, numbered("zn", 5));
            fresh.commitTransaction();
        }
        long started = System.currentTimeMillis();
        String error = "none";
        try {
            sendAll(old, topic, numbered("zz", 1));
            old.commitTransaction();
        } catch (Exception e) {
            Throwable t = e;
            while (t.getCause() != null && !(t instanceof KafkaException && t.getCause() == null)) {
                if (t instanceof org.apache.kafka.common.errors.ProducerFencedException
                        || t instanceof org.apache.kafka.common.errors.InvalidProducerEpochException) break;
                t = t.getCause();
            }
            error = t.getClass().getSimpleName();
        } finally {
            try { old.close(Duration.ofSeconds(5)); } catch (Exception ignored) { }
        }
        long tookMs = System.currentTimeMillis() - started;
        check(!error.equals("none"), "the zombie's commit went through");
        check(tookMs < 60_000, "the zombie gave up in time, took " + tookMs + " ms");
        List<String> committed = readAll(topic, "read_committed", 5);
        sameSet(committed, numbered("zn", 5), "only the new instance's transaction is committed");
        System.out.println("RESULT zombie_error=" + error);
        System.out.println("RESULT zombie_ms=" + tookMs);
    }
}
