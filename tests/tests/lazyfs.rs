//! The lazy filesystem mounted for real (FUSE, in this process): what
//! `std::fs`, shell tools and `mmap` see, what a power cut keeps, and a real
//! `txmq-broker` with `--flush sync` that loses no acknowledged message when
//! the power goes.
//!
//! The two broker tests found that new consume-queue directories were not
//! fsynced into their parents (acknowledged messages lost in a cut); the
//! store now creates its directories durably.
//!
//! These tests need `/dev/fuse` and the right to mount (root, or
//! `fusermount3` from Debian's `fuse3`); without them they fail saying so.

mod common;

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{body_text, create_topic, start_broker, wait_for_route};
use txmq::{Message, SendStatus};
use txmq_tests::lazyfs::LazyFs;
use txmq_tests::{consume_all, Cluster};

/// A temporary directory with the lazy filesystem mounted on `mnt` inside.
/// Field order matters: the mount goes before the directory.
struct Mounted {
    fs: LazyFs,
    mnt: PathBuf,
    _tmp: tempfile::TempDir,
}

fn mount() -> Mounted {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).expect("mount point");
    let fs = LazyFs::mount(&mnt).unwrap_or_else(|e| panic!("lazyfs cannot mount here: {e}"));
    Mounted { fs, mnt, _tmp: tmp }
}

fn fsync_dir(dir: &Path) {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("fsync {}: {e}", dir.display()));
}

fn write_file(path: &Path, data: &[u8], fsync: bool) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).expect("write");
    if fsync {
        f.sync_all().expect("fsync");
    }
}

fn read(path: &Path) -> Option<Vec<u8>> {
    match fs::read(path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

#[test]
fn only_what_was_fsynced_survives_a_power_cut() {
    let m = mount();
    let d = m.mnt.join("d");
    fs::create_dir(&d).unwrap();
    fsync_dir(&m.mnt);
    write_file(&d.join("synced"), b"file and directory fsynced", true);
    write_file(&d.join("data-not-synced"), b"only the directory", false);
    fsync_dir(&d);
    write_file(&d.join("name-not-synced"), b"only the file", true);
    write_file(&d.join("nothing-synced"), b"neither", false);
    // Appended after the fsync: lost.
    OpenOptions::new()
        .append(true)
        .open(d.join("synced"))
        .and_then(|mut f| f.write_all(b" + unsynced tail"))
        .unwrap();
    assert_eq!(m.fs.unsynced_bytes(), (18 + 7 + 16) as u64);
    let fsyncs = m.fs.stats().fsyncs;
    assert!(fsyncs >= 2, "fsyncs seen: {fsyncs}");

    let report = m.fs.power_cut(None).expect("power cut");
    assert_eq!(
        read(&d.join("synced")).unwrap(),
        b"file and directory fsynced"
    );
    assert_eq!(read(&d.join("data-not-synced")).unwrap(), b"");
    assert_eq!(read(&d.join("name-not-synced")), None);
    assert_eq!(read(&d.join("nothing-synced")), None);
    let mut names: Vec<String> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["data-not-synced", "synced"]);
    assert_eq!(report.unsynced_bytes_lost, 18 + 7 + 16);
    assert_eq!(report.inodes_lost, 2);
    let lost = [
        PathBuf::from("d/name-not-synced"),
        "d/nothing-synced".into(),
    ];
    assert_eq!(report.lost_paths, lost);
    assert_eq!(m.fs.unsynced_bytes(), 0);
    assert_eq!(m.fs.stats().last_cut, Some(report));

    // The filesystem is fully usable after the cut.
    write_file(&d.join("after"), b"new", true);
    fsync_dir(&d);
    m.fs.power_cut(None).unwrap();
    assert_eq!(read(&d.join("after")).unwrap(), b"new");
}

/// Writes `checkpoint` the way the broker does: a temporary file, fsync,
/// rename over the old one, then (maybe) fsync the directory.
fn write_checkpoint(dir: &Path, body: &[u8], fsync_dir_after: bool) {
    let tmp = dir.join("checkpoint.tmp");
    write_file(&tmp, body, true);
    fs::rename(&tmp, dir.join("checkpoint")).unwrap();
    if fsync_dir_after {
        fsync_dir(dir);
    }
}

#[test]
fn a_rename_over_a_file_is_durable_after_the_directory_fsync() {
    let m = mount();
    write_checkpoint(&m.mnt, b"v1", true);
    write_checkpoint(&m.mnt, b"v2", false);
    assert_eq!(read(&m.mnt.join("checkpoint")).unwrap(), b"v2");
    m.fs.power_cut(None).unwrap();
    assert_eq!(read(&m.mnt.join("checkpoint")).unwrap(), b"v1");
    assert_eq!(read(&m.mnt.join("checkpoint.tmp")), None);

    write_checkpoint(&m.mnt, b"v3", true);
    fs::remove_file(m.mnt.join("checkpoint")).unwrap();
    m.fs.power_cut(None).unwrap();
    assert_eq!(
        read(&m.mnt.join("checkpoint")).unwrap(),
        b"v3",
        "an unlink without a directory fsync is undone"
    );
}

#[test]
fn a_read_only_mmap_sees_pwritten_data_before_and_after_a_cut() {
    let m = mount();
    let path = m.mnt.join("segment");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    file.set_len(1 << 20).unwrap();
    file.sync_all().unwrap();
    fsync_dir(&m.mnt);
    // SAFETY: the file is not truncated while mapped; this test is its only
    // user.
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(&file) }.expect("mmap");
    assert_eq!(map.len(), 1 << 20);
    assert!(map[..4096].iter().all(|&b| b == 0));

    file.write_at(b"durable record", 100).unwrap();
    assert_eq!(&map[100..114], b"durable record");
    file.sync_data().unwrap();
    // Across a page boundary, not synced.
    file.write_at(b"volatile record", 4090).unwrap();
    assert_eq!(&map[4090..4105], b"volatile record");
    drop(map);
    drop(file);

    m.fs.power_cut(None).unwrap();
    let file = File::open(&path).unwrap();
    // SAFETY: as above.
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(&file) }.expect("mmap after the cut");
    assert_eq!(map.len(), 1 << 20);
    assert_eq!(&map[100..114], b"durable record");
    assert!(
        map[4090..4105].iter().all(|&b| b == 0),
        "the unsynced write is gone, not cached"
    );
}

#[test]
fn a_torn_write_leaves_a_prefix() {
    let m = mount();
    let path = m.mnt.join("log");
    write_file(&path, b"header:", true);
    fsync_dir(&m.mnt);
    let record: Vec<u8> = (0..3000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut kept_lengths = HashSet::new();
    for seed in 0..8 {
        OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&record))
            .unwrap();
        let report = m.fs.power_cut(Some(seed)).unwrap();
        assert_eq!(report.torn.len(), 1, "{report:?}");
        let torn = &report.torn[0];
        assert_eq!(torn.path, PathBuf::from("log"));
        assert_eq!((torn.offset, torn.len), (7, 3000));
        assert!(torn.kept < 3000);
        let mut want = b"header:".to_vec();
        want.extend_from_slice(&record[..torn.kept as usize]);
        assert_eq!(read(&path).unwrap(), want, "seed {seed}");
        kept_lengths.insert(torn.kept);
        // Back to the header for the next round.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(7).unwrap();
        f.sync_all().unwrap();
    }
    assert!(
        kept_lengths.len() > 1,
        "every seed tore at {kept_lengths:?}"
    );
}

#[test]
fn a_big_sparse_file_costs_only_its_written_pages() {
    let m = mount();
    let path = m.mnt.join("big");
    let file = File::create(&path).unwrap();
    file.set_len(1 << 30).unwrap();
    file.write_at(b"tail", (1 << 30) - 4).unwrap();
    file.sync_all().unwrap();
    fsync_dir(&m.mnt);
    drop(file);
    m.fs.power_cut(None).unwrap();
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    let f = File::open(&path).unwrap();
    let mut buf = [0u8; 8];
    f.read_exact_at(&mut buf, (1 << 30) - 8).unwrap();
    assert_eq!(&buf, b"\0\0\0\0tail");
    let pages = m.fs.with_model(|model| {
        let ino = model.resolve("big").expect("big exists");
        model.allocated_pages(ino)
    });
    assert_eq!(pages, Some((1, 1)));
}

#[test]
fn shell_tools_work_on_it() {
    let m = mount();
    let script = r#"
        set -e
        mkdir -p a/b/c
        for i in $(seq 1 300); do echo "line $i" > a/b/file-$i; done
        test "$(ls a/b | wc -l)" = 301
        cp a/b/file-7 a/copy
        mv a/copy a/b/c/moved
        grep -q "line 7" a/b/c/moved
        chmod 600 a/b/c/moved
        test "$(stat -c %a a/b/c/moved)" = 600
        touch -d 2001-02-03 a/b/file-1
        test "$(stat -c %Y a/b/file-1)" = "$(date -d 2001-02-03 +%s)"
        truncate -s 10M a/big
        test "$(stat -c %s a/big)" = 10485760
        fallocate -l 20M a/big
        test "$(stat -c %s a/big)" = 20971520
        df . > /dev/null
        sync a/b/file-2
        rm -r a/b
        test ! -e a/b
        ! rmdir a 2>/dev/null
        rm a/big
        rmdir a
        test -z "$(ls -A .)"
    "#;
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(&m.mnt)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "script failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing was durable: the cut leaves an empty root.
    m.fs.power_cut(None).unwrap();
    assert_eq!(fs::read_dir(&m.mnt).unwrap().count(), 0);
}

/// Sends `n` messages to `topic`, one at a time, and returns the bodies the
/// broker acknowledged with `SEND_OK` (with `--flush sync`: once fsynced;
/// with `async`: once written).
async fn send_acked(ns: &str, topic: &str, tag: &str, n: usize) -> Vec<String> {
    let producer = txmq::Producer::builder()
        .nameserver(ns)
        .send_timeout(Duration::from_secs(5))
        // One attempt per message, so that none is stored twice.
        .retries(0)
        .build()
        .await
        .expect("producer builds");
    let mut acked = Vec::new();
    for i in 0..n {
        let body = format!("{tag}-{i}-{}", "x".repeat(i % 300));
        let r = producer
            .send(Message::new(topic, body.clone()))
            .await
            .unwrap_or_else(|e| panic!("send {body}: {e}"));
        assert_eq!(r.status, SendStatus::SendOk, "{body}");
        acked.push(body);
    }
    producer.close().await.unwrap();
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_flush_broker_loses_no_acknowledged_message_in_a_power_cut() {
    let m = mount();
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let data = m.mnt.clone();
    let mut broker = start_broker(&data, &ns, "broker-a", &["--flush", "sync"]).await;
    create_topic(&ns, "power", 2).await;
    wait_for_route(&ns, "power", &["broker-a"]).await;

    let mut acked = Vec::new();
    for (round, tear) in [(0, None), (1, Some(42)), (2, Some(7))] {
        acked.extend(send_acked(&ns, "power", &format!("round{round}"), 200).await);
        // Let a checkpoint (every second) cover them: recovery then trusts
        // the consume queues up to it.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let stats = m.fs.stats();
        assert!(
            stats.fsyncs > 0,
            "the broker never fsynced on lazyfs: {stats:?}"
        );
        tokio::task::block_in_place(|| broker.kill9());
        let report = tokio::task::block_in_place(|| m.fs.power_cut(tear))
            .unwrap_or_else(|e| panic!("power cut: {e}"));
        eprintln!("round {round}: cut with tear {tear:?}: {report:?}");
        tokio::task::block_in_place(|| broker.restart());
        wait_for_route(&ns, "power", &["broker-a"]).await;
    }

    let got = consume_all(
        &ns,
        "after-cut",
        "power",
        acked.len(),
        Duration::from_secs(3),
    )
    .await;
    let bodies: HashSet<String> = got.iter().map(body_text).collect();
    let lost: Vec<&String> = acked.iter().filter(|b| !bodies.contains(*b)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost after power cuts, e.g. {:?}; broker log:\n{}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)],
        broker.log_text()
    );
    drop(broker);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_flush_broker_recovers_from_torn_writes_and_keeps_what_was_flushed() {
    let m = mount();
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let mut broker = start_broker(&m.mnt, &ns, "broker-a", &["--flush", "async"]).await;
    create_topic(&ns, "torn", 2).await;
    wait_for_route(&ns, "torn", &["broker-a"]).await;

    let (mut early, mut late) = (Vec::new(), Vec::new());
    for seed in 0..3 {
        // Flushed: the broker fsyncs every 500 ms.
        early.extend(send_acked(&ns, "torn", &format!("early{seed}"), 100).await);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Acknowledged from the page cache, then the power goes.
        late.extend(send_acked(&ns, "torn", &format!("late{seed}"), 100).await);
        tokio::task::block_in_place(|| broker.kill9());
        let report = tokio::task::block_in_place(|| m.fs.power_cut(Some(seed)))
            .unwrap_or_else(|e| panic!("power cut: {e}"));
        eprintln!("round {seed}: torn cut: {report:?}");
        tokio::task::block_in_place(|| broker.restart());
        wait_for_route(&ns, "torn", &["broker-a"]).await;
    }

    let got = consume_all(&ns, "after-cut", "torn", usize::MAX, Duration::from_secs(3)).await;
    let mut bodies = HashSet::new();
    for msg in &got {
        let body = body_text(msg);
        assert!(
            early.contains(&body) || late.contains(&body),
            "consumed {body:?}, which was never sent"
        );
        assert!(bodies.insert(body.clone()), "{body} consumed twice");
    }
    let lost_early: Vec<&String> = early.iter().filter(|b| !bodies.contains(*b)).collect();
    assert!(
        lost_early.is_empty(),
        "{} flushed messages lost, e.g. {:?}; broker log:\n{}",
        lost_early.len(),
        &lost_early[..lost_early.len().min(5)],
        broker.log_text()
    );
    let late_kept = late.iter().filter(|b| bodies.contains(*b)).count();
    eprintln!("{late_kept} of {} unflushed messages survived", late.len());
    assert!(
        late_kept < late.len(),
        "every unflushed message survived three power cuts: the cut dropped nothing"
    );
    drop(broker);
    cluster.shutdown().await;
}
