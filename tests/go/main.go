// franz-go (github.com/twmb/franz-go) driven by the integration tests, through the proxy.
//
//	go run . <scenario> <bootstrap> <name-prefix>
//
// Each scenario checks its own outcome and exits 1 if anything is off; on success it prints
// `RESULT key=value` lines the Rust test asserts on as well. Scenarios:
//
//	produce  an idempotent producer (franz-go's default) writes 500 records; a consumer group reads
//	         each exactly once; the brokers the client learns are printed
//	txn      one committed and one aborted transaction; read_committed sees only the committed one,
//	         read_uncommitted sees both
//	zombie   a transactional client fenced by a newer one with the same transactional id: its next
//	         write or commit fails at once (no retry loop) and nothing of it is read committed
//	refusals (through a proxy with the refusals policy of tests/it/refusals.rs) each error the proxy
//	         answers by itself, met as franz-go meets the broker's own: a non-idempotent write (44), a
//	         gzip batch (76), a transaction timeout above the bound (50), a transactional id another
//	         client owns (53); prints each error and how long the client took to give up. Then a new
//	         producer id over the rate limit (89, throttled): the client waits for the window and writes
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

var bootstrap, prefix string

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func check(ok bool, format string, args ...any) {
	if !ok {
		fail(format, args...)
	}
}

func client(opts ...kgo.Opt) *kgo.Client {
	base := []kgo.Opt{kgo.SeedBrokers(bootstrap), kgo.RequestTimeoutOverhead(20 * time.Second)}
	// TLS to the proxy when the test says so: EOS_TLS_CA is the PEM file of the CA to trust.
	if ca := os.Getenv("EOS_TLS_CA"); ca != "" {
		pem, err := os.ReadFile(ca)
		if err != nil {
			fail("EOS_TLS_CA: %v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			fail("EOS_TLS_CA: no certificate in %s", ca)
		}
		base = append(base, kgo.DialTLSConfig(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}))
	}
	cl, err := kgo.NewClient(append(base, opts...)...)
	if err != nil {
		fail("client: %v", err)
	}
	return cl
}

func createTopic(ctx context.Context, topic string, partitions int32, rf int16) {
	cl := client()
	defer cl.Close()
	adm := kadm.NewClient(cl)
	// No more replicas than brokers (the single-broker cluster of the TLS tests).
	if brokers, err := adm.ListBrokers(ctx); err == nil && len(brokers) < int(rf) {
		rf = int16(len(brokers))
	}
	resp, err := adm.CreateTopic(ctx, partitions, rf, nil, topic)
	if err != nil || resp.Err != nil {
		fail("create %s: %v %v", topic, err, resp.Err)
	}
	// Wait until every partition has a leader (a new topic reaches the brokers a moment later).
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		md, err := adm.Metadata(ctx, topic)
		if err == nil {
			if t, ok := md.Topics[topic]; ok && t.Err == nil && len(t.Partitions) == int(partitions) {
				ready := true
				for _, p := range t.Partitions {
					ready = ready && p.Leader >= 0 && p.Err == nil
				}
				if ready {
					return
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	fail("%s has no leaders after 30 s", topic)
}

func numbered(p string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s-%05d", p, i)
	}
	return out
}

func produceAll(ctx context.Context, cl *kgo.Client, topic string, values []string) {
	records := make([]*kgo.Record, len(values))
	for i, v := range values {
		records[i] = &kgo.Record{Topic: topic, Key: []byte(v), Value: []byte(v)}
	}
	if err := cl.ProduceSync(ctx, records...).FirstErr(); err != nil {
		fail("produce: %v", err)
	}
}

// readAll reads the topic from the start until `want` records arrived or 60 s passed.
func readAll(ctx context.Context, topic string, level kgo.IsolationLevel, want int, extra ...kgo.Opt) []string {
	opts := append([]kgo.Opt{kgo.ConsumeTopics(topic), kgo.FetchIsolationLevel(level),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart())}, extra...)
	cl := client(opts...)
	defer cl.Close()
	var out []string
	deadline := time.Now().Add(60 * time.Second)
	for len(out) < want && time.Now().Before(deadline) {
		pctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		fetches := cl.PollFetches(pctx)
		cancel()
		fetches.EachRecord(func(r *kgo.Record) { out = append(out, string(r.Value)) })
		if len(extra) > 0 {
			if err := cl.CommitUncommittedOffsets(ctx); err != nil {
				fail("commit: %v", err)
			}
		}
	}
	// A moment more: nothing may come twice.
	pctx, cancel := context.WithTimeout(ctx, time.Second)
	cl.PollFetches(pctx).EachRecord(func(r *kgo.Record) { out = append(out, string(r.Value)) })
	cancel()
	return out
}

func sameSet(got, want []string, what string) {
	g := append([]string(nil), got...)
	w := append([]string(nil), want...)
	sort.Strings(g)
	sort.Strings(w)
	check(len(g) == len(w), "%s: got %d records, want %d", what, len(g), len(w))
	for i := range g {
		check(g[i] == w[i], "%s: %s where %s was expected", what, g[i], w[i])
	}
}

func produce(ctx context.Context) {
	topic := prefix + "-produce"
	createTopic(ctx, topic, 3, 3)
	cl := client(kgo.DefaultProduceTopic(topic))
	values := numbered("gp", 500)
	produceAll(ctx, cl, topic, values)
	adm := kadm.NewClient(cl)
	md, err := adm.BrokerMetadata(ctx)
	if err != nil {
		fail("metadata: %v", err)
	}
	for _, b := range md.Brokers {
		fmt.Printf("RESULT broker=%d@%s:%d\n", b.NodeID, b.Host, b.Port)
	}
	cl.Close()
	got := readAll(ctx, topic, kgo.ReadUncommitted(), len(values), kgo.ConsumerGroup(prefix+"-group"))
	sameSet(got, values, "every record once through a consumer group")
	fmt.Printf("RESULT consumed=%d\n", len(got))
}

func txn(ctx context.Context) {
	topic := prefix + "-txn"
	createTopic(ctx, topic, 2, 3)
	cl := client(kgo.TransactionalID(prefix+"-txn-id"), kgo.DefaultProduceTopic(topic))
	defer cl.Close()
	for _, step := range []struct {
		values []string
		commit kgo.TransactionEndTry
	}{{numbered("gc", 25), kgo.TryCommit}, {numbered("ga", 10), kgo.TryAbort}} {
		if err := cl.BeginTransaction(); err != nil {
			fail("begin: %v", err)
		}
		produceAll(ctx, cl, topic, step.values)
		if err := cl.EndTransaction(ctx, step.commit); err != nil {
			fail("end: %v", err)
		}
	}
	committed := readAll(ctx, topic, kgo.ReadCommitted(), 25)
	sameSet(committed, numbered("gc", 25), "read_committed sees only the committed transaction")
	all := readAll(ctx, topic, kgo.ReadUncommitted(), 35)
	sameSet(all, append(numbered("gc", 25), numbered("ga", 10)...), "read_uncommitted sees both")
	fmt.Printf("RESULT committed=%d\n", len(committed))
	fmt.Printf("RESULT uncommitted=%d\n", len(all))
}

func zombie(ctx context.Context) {
	topic := prefix + "-zombie"
	createTopic(ctx, topic, 1, 3)
	id := prefix + "-zombie-id"
	old := client(kgo.TransactionalID(id), kgo.DefaultProduceTopic(topic))
	defer old.Close()
	if err := old.BeginTransaction(); err != nil {
		fail("begin: %v", err)
	}
	produceAll(ctx, old, topic, numbered("zo", 5))
	fresh := client(kgo.TransactionalID(id), kgo.DefaultProduceTopic(topic))
	if err := fresh.BeginTransaction(); err != nil {
		fail("begin (new instance): %v", err)
	}
	produceAll(ctx, fresh, topic, numbered("zn", 5))
	if err := fresh.EndTransaction(ctx, kgo.TryCommit); err != nil {
		fail("commit (new instance): %v", err)
	}
	fresh.Close()
	started := time.Now()
	records := []*kgo.Record{{Topic: topic, Value: []byte("zz-00000")}}
	err := old.ProduceSync(ctx, records...).FirstErr()
	if err == nil {
		err = old.EndTransaction(ctx, kgo.TryCommit)
	}
	took := time.Since(started)
	check(err != nil, "the zombie's commit went through")
	check(took < 60*time.Second, "the zombie gave up in time, took %v", took)
	committed := readAll(ctx, topic, kgo.ReadCommitted(), 5)
	sameSet(committed, numbered("zn", 5), "only the new instance's transaction is committed")
	fmt.Printf("RESULT zombie_error=%v\n", err)
	fmt.Printf("RESULT zombie_ms=%d\n", took.Milliseconds())
}

// refusal runs op, which must fail, and prints its error and how long the client took to give up.
func refusal(name string, op func() error) {
	started := time.Now()
	err := op()
	took := time.Since(started)
	check(err != nil, "%s: went through", name)
	fmt.Printf("RESULT %s=%v\n", name, err)
	fmt.Printf("RESULT %s_ms=%d\n", name, took.Milliseconds())
}

func refusals(ctx context.Context) {
	idem, codec := "refusal-idem-"+prefix, "refusal-codec-"+prefix
	createTopic(ctx, idem, 1, 1)
	createTopic(ctx, codec, 1, 1)
	// Compressible, so that the codec is really used (clients send a batch uncompressed when
	// compressing does not make it smaller).
	value := []byte(strings.Repeat("compressible ", 100))
	one := func(cl *kgo.Client, topic string) error {
		defer cl.Close()
		return cl.ProduceSync(ctx, &kgo.Record{Topic: topic, Value: value}).FirstErr()
	}
	refusal("idempotence", func() error {
		return one(client(kgo.DisableIdempotentWrite(), kgo.RequiredAcks(kgo.LeaderAck())), idem)
	})
	refusal("compression", func() error {
		return one(client(kgo.ProducerBatchCompression(kgo.GzipCompression())), codec)
	})
	txnFirstWrite := func(id string, timeout time.Duration) error {
		cl := client(kgo.TransactionalID(id), kgo.TransactionTimeout(timeout))
		defer cl.Close()
		if err := cl.BeginTransaction(); err != nil {
			return err
		}
		err := cl.ProduceSync(ctx, &kgo.Record{Topic: idem, Value: []byte("t")}).FirstErr()
		if err == nil {
			err = cl.EndTransaction(ctx, kgo.TryCommit)
		}
		return err
	}
	refusal("transaction_timeout", func() error { return txnFirstWrite(prefix+"-long", 120*time.Second) })
	refusal("owner", func() error { return txnFirstWrite("refusal-owned-"+prefix, 30*time.Second) })
	// The idempotent client of the compression step took this address's one new producer id of the
	// minute: the next one is throttled (89 with the time left) until the minute has room.
	started := time.Now()
	if err := one(client(), idem); err != nil {
		fail("rate: %v", err)
	}
	fmt.Println("RESULT rate=written")
	fmt.Printf("RESULT rate_ms=%d\n", time.Since(started).Milliseconds())
}

func main() {
	if len(os.Args) != 4 {
		fail("usage: eosclient scenario bootstrap prefix")
	}
	bootstrap, prefix = os.Args[2], os.Args[3]
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	switch os.Args[1] {
	case "produce":
		produce(ctx)
	case "txn":
		txn(ctx)
	case "zombie":
		zombie(ctx)
	case "refusals":
		refusals(ctx)
	default:
		fail("unknown scenario %s", os.Args[1])
	}
	fmt.Println("RESULT ok=true")
}
