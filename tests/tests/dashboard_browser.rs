//! The dashboard (issue 18) in a real headless Chromium through WebDriver:
//! real `txmq-nameserver`, `txmq-broker` and `txmq dashboard` processes,
//! driven by clicks and form fills as a person would, against the HTML
//! contract of the pages (ids, `data-*` attributes, forms).
//!
//! Each test saves a screenshot under `target/dashboard-screenshots/`.
//! Without `chromium` or `chromedriver` (Debian's `chromium` and
//! `chromium-driver`; `.ci/run` installs them) every test skips, saying
//! what is missing. The tests take turns: two Chromiums and their brokers
//! at once would only slow each other down on a small machine.

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use txmq::{Message, Producer};
use txmq_tests::browser::{Browser, Dashboard};
use txmq_tests::output::{ok, stdout};
use txmq_tests::{free_port, json_lines, txmq_cli, BrokerProcess, NameserverProcess};

/// One test at a time (see the header).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A nameserver, a broker, a dashboard and a browser, all real processes.
struct Setup {
    browser: Browser,
    dashboard: Dashboard,
    ns: String,
    _broker: BrokerProcess,
    _nameserver: NameserverProcess,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// Everything started and the broker registered; `None` (after saying
    /// what is missing) when there is no browser to run.
    async fn start(test: &str) -> Option<Setup> {
        if let Some(missing) = Browser::missing() {
            eprintln!("skipping the browser test {test}: {missing} not found");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let ns = format!("127.0.0.1:{}", free_port());
        let nameserver = NameserverProcess::start(&ns, &[], &dir.path().join("nameserver.log"));
        // Transactions left unknown by a producer that is gone stay pending
        // (a check-back that cannot be sent is not counted).
        let broker = BrokerProcess::start(
            &dir.path().join("broker"),
            &ns,
            "broker-a",
            &[
                "--transaction-timeout",
                "300ms",
                "--transaction-check-interval",
                "300ms",
            ],
        );
        wait_until("the broker registers", || {
            let out = txmq_cli(&ns, &["cluster"], None);
            out.status.success() && stdout(&out).contains("broker-a")
        })
        .await;
        let dashboard = Dashboard::start(&ns, &[], &dir.path().join("dashboard.log"));
        let browser = Browser::start().await;
        Some(Setup {
            browser,
            dashboard,
            ns,
            _broker: broker,
            _nameserver: nameserver,
            _dir: dir,
        })
    }

    fn cli(&self, args: &[&str]) -> Output {
        txmq_cli(&self.ns, args, None)
    }

    fn json(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        ok(&out);
        json_lines(&out.stdout)
    }

    async fn goto(&self, path: &str) {
        self.browser.goto(&self.dashboard.at(path)).await;
    }

    /// Saves the screenshot, then ends the browser session.
    async fn finish(self, name: &str) {
        let path = self.browser.screenshot(name).await;
        eprintln!("screenshot: {}", path.display());
        self.browser.close().await;
    }
}

/// Polls `f` every 100 ms until it holds; panics naming `what` after 20 s.
async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A number shown in the page (an attribute or a cell), `None` if it is not one.
fn number(text: &str) -> Option<f64> {
    text.trim().replace(',', "").parse().ok()
}

#[tokio::test]
async fn overview_shows_the_brokers() {
    let _turn = TURN.lock().await;
    let Some(s) = Setup::start("overview_shows_the_brokers").await else {
        return;
    };
    s.goto("/").await;
    let row = s
        .browser
        .text("table#brokers tr[data-broker=\"broker-a\"]")
        .await;
    assert!(row.contains("broker-a"), "the row names the broker: {row}");
    let addr = s.json(&["cluster"])[0]["addr"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_default();
    if !addr.is_empty() {
        assert!(
            row.contains(&addr),
            "the row shows its address {addr}: {row}"
        );
    }
    // Every page has the same navigation.
    for id in [
        "nav-overview",
        "nav-topics",
        "nav-groups",
        "nav-transactions",
        "nav-messages",
        "nav-dlq",
    ] {
        s.browser.find(&format!("nav a#{id}")).await;
    }
    s.browser.find("svg#chart-messages").await;
    s.browser.find("svg#chart-transactions").await;
    s.finish("overview").await;
}

#[tokio::test]
async fn create_a_topic_in_the_page() {
    let _turn = TURN.lock().await;
    let Some(s) = Setup::start("create_a_topic_in_the_page").await else {
        return;
    };
    s.goto("/topics").await;
    assert!(!s.browser.exists("tr[data-topic=\"made-in-browser\"]").await);
    s.browser
        .fill("form#create-topic", "topic", "made-in-browser")
        .await;
    s.browser.fill("form#create-topic", "queues", "3").await;
    s.browser.click("button#create-topic-submit").await;
    let flash = s.browser.text("div.flash").await;
    assert!(
        flash.contains("made-in-browser"),
        "the result names the topic: {flash}"
    );
    s.goto("/topics?q=made-in-browser").await;
    let row = s
        .browser
        .text("table#topics tr[data-topic=\"made-in-browser\"]")
        .await;
    assert!(row.contains('3'), "three queues: {row}");
    // The cluster has it, not just the page.
    let listed = stdout(&s.cli(&["topic", "list"]));
    assert!(listed.contains("made-in-browser"), "{listed}");
    s.finish("topic-created").await;
}

#[tokio::test]
async fn the_rate_chart_moves_while_messages_are_sent() {
    let _turn = TURN.lock().await;
    let Some(s) = Setup::start("the_rate_chart_moves_while_messages_are_sent").await else {
        return;
    };
    ok(&s.cli(&["topic", "create", "rates", "--queues", "2"]));
    s.goto("/").await;
    let chart = "svg#chart-messages";
    let last_in = |v: Option<String>| v.as_deref().and_then(number).unwrap_or(0.0);
    let before = last_in(
        s.browser
            .find(chart)
            .await
            .attr("data-last-in")
            .await
            .ok()
            .flatten(),
    );
    assert_eq!(before, 0.0, "nothing sent yet");

    // A producer sends steadily while the page refreshes itself.
    let producer = Producer::builder()
        .nameserver(&s.ns)
        .build()
        .await
        .expect("producer");
    let stop = tokio_util::sync::CancellationToken::new();
    let sender = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = 0u64;
            while !stop.is_cancelled() {
                producer
                    .send(Message::new("rates", format!("m{sent}")))
                    .await
                    .expect("send");
                sent += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            producer.close().await.unwrap();
            sent
        })
    };
    // The sampler runs every 2 s and the page asks every 2 s: no reload.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = 0.0;
    while seen <= 0.0 {
        assert!(
            Instant::now() < deadline,
            "{chart} data-last-in stayed 0 while messages were sent"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let attr = s.browser.find(chart).await.attr("data-last-in").await;
        seen = last_in(attr.ok().flatten());
    }
    // The line of messages in is drawn once there are two samples; keep
    // sending until it is, so that it rises off the axis.
    s.browser.find("svg#chart-messages polyline").await;
    // A few more points make the picture of the README.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let points = s
            .browser
            .client()
            .execute(
                "return document.querySelector('svg#chart-messages polyline').points.numberOfItems",
                vec![],
            )
            .await
            .expect("count the points");
        if points.as_u64() >= Some(5) {
            break;
        }
        assert!(Instant::now() < deadline, "the chart stopped refreshing");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    let sent = sender.await.expect("sender");
    assert!(sent > 0);
    s.finish("chart-messages").await;
}

#[tokio::test]
async fn an_unknown_transaction_is_committed_with_a_click() {
    let _turn = TURN.lock().await;
    let Some(s) = Setup::start("an_unknown_transaction_is_committed_with_a_click").await else {
        return;
    };
    ok(&s.cli(&["topic", "create", "orders", "--queues", "2"]));
    // The producer leaves it unknown and goes away: it stays pending.
    let sent = s.json(&[
        "tx", "send", "orders", "--group", "pg", "--body", "order 42", "--key", "o42", "--local",
        "unknown",
    ]);
    let tx_id = sent[0]["tx_id"].as_u64().expect("tx_id").to_string();

    s.goto("/transactions").await;
    let row = format!("table#transactions tr[data-tx-id=\"{tx_id}\"][data-broker=\"broker-a\"]");
    let text = s.browser.text(&row).await;
    assert!(
        text.contains("pg"),
        "the row names the producer group: {text}"
    );
    assert!(text.contains("orders"), "the row names the topic: {text}");
    assert!(text.contains("pending"), "the row says pending: {text}");

    s.goto(&format!("/transactions/broker-a/{tx_id}")).await;
    let page = s.browser.body_text().await;
    assert!(page.contains("order 42"), "the half message's body: {page}");
    s.browser.find("table#check-history").await;
    s.browser.click("a#commit").await;
    let confirm = s.browser.text("p#confirm-text").await;
    assert!(
        confirm.contains(&format!("Commit transaction {tx_id} on broker-a")),
        "the confirmation names what will happen: {confirm}"
    );
    assert!(confirm.contains("orders"), "and the topic: {confirm}");
    // Nothing happened before the confirmation.
    assert_eq!(
        s.json(&["tx", "show", &tx_id])[0]["state"],
        "prepared",
        "the commit link alone changes nothing"
    );
    s.browser.click("button#confirm").await;
    let flash = s.browser.text("div.flash").await;
    assert!(
        flash.contains(&tx_id),
        "the result names the transaction: {flash}"
    );
    s.browser.screenshot("transaction-committed").await;

    // Its message is now visible to consumers.
    let got = s.json(&[
        "consume",
        "orders",
        "--group",
        "after-commit",
        "--idle-timeout",
        "2s",
        "--commit-interval",
        "100ms",
    ]);
    assert!(
        got.iter().any(|m| m["body"] == "order 42"),
        "the committed message is consumed: {got:?}"
    );
    // Gone from the pending list.
    s.goto("/transactions").await;
    s.browser.find("table#transactions").await;
    assert!(!s.browser.exists(&row).await, "no longer pending");
    // The transaction's own page, for the README.
    s.goto(&format!("/transactions/broker-a/{tx_id}")).await;
    s.finish("transaction").await;
}

#[tokio::test]
async fn a_pending_transaction_page() {
    let _turn = TURN.lock().await;
    let Some(s) = Setup::start("a_pending_transaction_page").await else {
        return;
    };
    ok(&s.cli(&["topic", "create", "payments", "--queues", "2"]));
    let sent = s.json(&[
        "tx",
        "send",
        "payments",
        "--group",
        "payment-service",
        "--body",
        "{\"payment\":7,\"amount\":\"12.50\"}",
        "--key",
        "pay-7",
        "--local",
        "unknown",
    ]);
    let tx_id = sent[0]["tx_id"].as_u64().expect("tx_id").to_string();
    // Let a few check-backs fail into the history.
    wait_until("a check-back is recorded", || {
        s.json(&["tx", "show", &tx_id])[0]["history"]
            .as_array()
            .is_some_and(|h| !h.is_empty())
    })
    .await;
    s.goto(&format!("/transactions/broker-a/{tx_id}")).await;
    let history = s.browser.text("table#check-history").await;
    assert!(
        history.contains("no producer"),
        "the failed check-back is shown: {history}"
    );
    for button in ["a#commit", "a#rollback", "a#recheck"] {
        s.browser.find(button).await;
    }
    s.finish("transaction-pending").await;
}

#[tokio::test]
async fn lookup_by_key_shows_the_body() {
    let _turn = TURN.lock().await;
    let Some(s) = Setup::start("lookup_by_key_shows_the_body").await else {
        return;
    };
    ok(&s.cli(&["topic", "create", "invoices", "--queues", "2"]));
    ok(&s.cli(&["send", "invoices", "--body", "other", "--key", "inv-1"]));
    ok(&s.cli(&[
        "send",
        "invoices",
        "--body",
        "{\"invoice\":2,\"total\":99}",
        "--key",
        "inv-2",
    ]));
    s.goto("/messages").await;
    s.browser.fill("form#by-key", "topic", "invoices").await;
    s.browser.fill("form#by-key", "key", "inv-2").await;
    // The index is written behind the store: retry the lookup until found.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        s.browser
            .click("form#by-key [type=submit], form#by-key button")
            .await;
        if s.browser.exists("table#messages tr[data-msg-id]").await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no message found by key: {}",
            s.browser.body_text().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.goto("/messages").await;
        s.browser.fill("form#by-key", "topic", "invoices").await;
        s.browser.fill("form#by-key", "key", "inv-2").await;
    }
    let rows = s
        .browser
        .client()
        .find_all(fantoccini::Locator::Css("table#messages tr[data-msg-id]"))
        .await
        .expect("rows");
    assert_eq!(rows.len(), 1, "only the message with key inv-2");
    s.browser.click("table#messages tr[data-msg-id] a").await;
    let body = s.browser.text("pre#body").await;
    assert!(body.contains("\"invoice\""), "the body is shown: {body}");
    assert!(
        body.contains('\n'),
        "JSON is pretty-printed over several lines: {body}"
    );
    s.browser.find("table#properties").await;
    s.finish("message-by-key").await;
}

#[tokio::test]
async fn a_groups_lag_drops_as_a_consumer_runs() {
    let _turn = TURN.lock().await;
    let Some(s) = Setup::start("a_groups_lag_drops_as_a_consumer_runs").await else {
        return;
    };
    ok(&s.cli(&["topic", "create", "backlog", "--queues", "2"]));
    ok(&s.cli(&["send", "backlog", "--body", "work", "--count", "200"]));
    // The group exists with most of the backlog still to do.
    ok(&s.cli(&[
        "consume",
        "backlog",
        "--group",
        "workers",
        "--count",
        "20",
        "--commit-interval",
        "100ms",
    ]));
    let lag = || async {
        s.goto("/groups/workers").await;
        let text = s.browser.text("span#total-lag").await;
        number(&text).unwrap_or_else(|| panic!("span#total-lag is not a number: {text:?}"))
    };
    let first = lag().await;
    assert!(first >= 100.0, "most of 200 messages are left: {first}");
    s.browser.find("table#group-queues td.lag").await;
    s.browser.screenshot("group-lagging").await;

    // A consumer works the rest off; the lag shown drops to 0.
    let ns = s.ns.clone();
    let consumer = std::thread::spawn(move || {
        txmq_cli(
            &ns,
            &[
                "consume",
                "backlog",
                "--group",
                "workers",
                "--idle-timeout",
                "3s",
                "--commit-interval",
                "100ms",
            ],
            None,
        )
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = first;
    while last > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the lag shown stayed at {last} (was {first})"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = lag().await;
        assert!(now <= last, "the lag only drops: {last} then {now}");
        last = now;
    }
    ok(
        &tokio::task::spawn_blocking(move || consumer.join().expect("consumer thread"))
            .await
            .expect("join"),
    );
    s.finish("group-lag").await;
}

#[tokio::test]
async fn a_forged_post_without_the_token_changes_nothing() {
    let _turn = TURN.lock().await;
    let Some(s) = Setup::start("a_forged_post_without_the_token_changes_nothing").await else {
        return;
    };
    s.goto("/topics").await;
    s.browser.fill("form#create-topic", "topic", "forged").await;
    let removed = s
        .browser
        .client()
        .execute(
            "const i = document.querySelector('form#create-topic input[name=csrf]'); \
             if (!i) return false; i.remove(); return true;",
            vec![],
        )
        .await
        .expect("run script");
    assert_eq!(removed, Value::Bool(true), "the form carried a csrf input");
    s.browser.click("button#create-topic-submit").await;
    let error = s.browser.text("div.error").await;
    assert!(
        error.to_lowercase().contains("not from this dashboard"),
        "the refusal says why: {error}"
    );
    assert!(!s.browser.exists("div.flash").await);
    // Nothing changed.
    s.browser.screenshot("forged-post").await;
    s.goto("/topics?q=forged").await;
    s.browser.find("table#topics").await;
    assert!(!s.browser.exists("tr[data-topic=\"forged\"]").await);
    let listed = stdout(&s.cli(&["topic", "list"]));
    assert!(!listed.contains("forged"), "{listed}");

    // A token that was not issued is refused the same way.
    s.goto("/topics").await;
    s.browser
        .fill("form#create-topic", "topic", "forged2")
        .await;
    s.browser
        .client()
        .execute(
            "document.querySelector('form#create-topic input[name=csrf]').value = 'not-a-token';",
            vec![],
        )
        .await
        .expect("run script");
    s.browser.click("button#create-topic-submit").await;
    s.browser.find("div.error").await;
    let listed = stdout(&s.cli(&["topic", "list"]));
    assert!(!listed.contains("forged2"), "{listed}");
    s.finish("forged-post-refused").await;
}
