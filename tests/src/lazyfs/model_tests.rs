//! Unit tests of the model: what survives a power cut, and what does not.

use super::*;

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn new_file(m: &mut Model, parent: u64, name: &str) -> u64 {
    m.create(parent, os(name), 0o100_644, 0, 0)
        .expect("create")
        .ino
        .0
}

fn new_dir(m: &mut Model, parent: u64, name: &str) -> u64 {
    m.mkdir(parent, os(name), 0o755, 0, 0).expect("mkdir").ino.0
}

/// The whole current contents of the file at `path`, or `None` if no
/// such file.
fn contents(m: &Model, path: &str) -> Option<Vec<u8>> {
    let ino = m.resolve(path)?;
    m.read(ino, 0, usize::MAX).ok()
}

#[test]
fn only_fsynced_data_and_size_survive_a_cut() {
    let mut m = Model::new();
    let f = new_file(&mut m, ROOT, "f");
    m.fsyncdir(ROOT).unwrap();
    m.write(f, 0, b"durable").unwrap();
    m.fsync(f).unwrap();
    m.write(f, 7, b"+lost").unwrap();
    m.setattr(
        f,
        SetAttr {
            size: Some(100),
            ..SetAttr::default()
        },
    )
    .unwrap();
    assert_eq!(m.getattr(f).unwrap().size, 100);
    assert_eq!(m.unsynced_bytes(), 5);

    let report = m.power_cut(None);
    assert_eq!(contents(&m, "f").unwrap(), b"durable");
    assert_eq!(m.getattr(f).unwrap().size, 7);
    assert_eq!(report.unsynced_bytes_lost, 5);
    assert_eq!(report.files_reverted, 1);
    assert_eq!(report.inodes_lost, 0);
    assert_eq!(m.unsynced_bytes(), 0);
    assert_eq!(m.stats().cuts, 1);
    assert_eq!(m.stats().fsyncs, 1);
}

#[test]
fn a_durable_set_len_survives_and_a_later_shrink_does_not() {
    let mut m = Model::new();
    let f = new_file(&mut m, ROOT, "seg");
    m.fsyncdir(ROOT).unwrap();
    let grow = SetAttr {
        size: Some(1 << 20),
        ..SetAttr::default()
    };
    m.setattr(f, grow).unwrap();
    m.write(f, 4096, b"record").unwrap();
    m.fsync(f).unwrap();
    let shrink = SetAttr {
        size: Some(10),
        ..SetAttr::default()
    };
    m.setattr(f, shrink).unwrap();
    m.power_cut(None);
    assert_eq!(m.getattr(f).unwrap().size, 1 << 20);
    assert_eq!(m.read(f, 4096, 6).unwrap(), b"record");
}

#[test]
fn a_torn_write_keeps_a_prefix_of_the_last_unsynced_write_only() {
    for seed in 0..50 {
        let mut m = Model::new();
        let f = new_file(&mut m, ROOT, "log");
        m.fsyncdir(ROOT).unwrap();
        m.write(f, 0, b"AAAA").unwrap();
        m.fsync(f).unwrap();
        m.write(f, 4, b"BBBB").unwrap(); // unsynced, not the last: lost whole
        m.write(f, 8, b"CCCCCCCC").unwrap(); // the last: torn
        let report = m.power_cut(Some(seed));
        assert_eq!(report.torn.len(), 1);
        let torn = &report.torn[0];
        assert_eq!(torn.path, PathBuf::from("log"));
        assert_eq!((torn.offset, torn.len), (8, 8));
        assert!(torn.kept < 8, "seed {seed}: all of the write survived");
        let got = contents(&m, "log").unwrap();
        if torn.kept == 0 {
            assert_eq!(got, b"AAAA", "seed {seed}");
        } else {
            // The file grows to the end of the kept prefix; the lost
            // earlier write is a hole.
            let mut want = b"AAAA\0\0\0\0".to_vec();
            want.extend(std::iter::repeat_n(b'C', torn.kept as usize));
            assert_eq!(got, want, "seed {seed}");
        }
        assert_eq!(report.unsynced_bytes_lost, 12 - torn.kept);
    }
    // Different seeds tear at different places.
    let kept: std::collections::HashSet<u64> = (0..50)
        .map(|seed| {
            let mut m = Model::new();
            let f = new_file(&mut m, ROOT, "log");
            m.fsyncdir(ROOT).unwrap();
            m.write(f, 0, &[1u8; 1000]).unwrap();
            m.power_cut(Some(seed)).torn[0].kept
        })
        .collect();
    assert!(kept.len() > 10, "tear lengths {kept:?}");
}

#[test]
fn an_fsynced_file_and_no_unsynced_write_is_not_torn() {
    let mut m = Model::new();
    let f = new_file(&mut m, ROOT, "f");
    m.fsyncdir(ROOT).unwrap();
    m.write(f, 0, b"all of it").unwrap();
    m.fsync(f).unwrap();
    let report = m.power_cut(Some(7));
    assert!(report.torn.is_empty());
    assert_eq!(contents(&m, "f").unwrap(), b"all of it");
}

#[test]
fn a_new_file_without_a_directory_fsync_disappears_even_if_fsynced() {
    let mut m = Model::new();
    let f = new_file(&mut m, ROOT, "new");
    m.write(f, 0, b"data").unwrap();
    m.fsync(f).unwrap();
    let report = m.power_cut(None);
    assert_eq!(m.resolve("new"), None);
    assert_eq!(report.inodes_lost, 1);
    assert_eq!(report.dirs_reverted, 1);
    assert_eq!(m.inode_count(), 1, "only the root is left");
}

#[test]
fn a_new_directory_needs_its_parent_fsynced_too() {
    for fsync_root in [false, true] {
        let mut m = Model::new();
        let d = new_dir(&mut m, ROOT, "d");
        let f = new_file(&mut m, d, "f");
        m.write(f, 0, b"x").unwrap();
        m.fsync(f).unwrap();
        m.fsyncdir(d).unwrap();
        if fsync_root {
            m.fsyncdir(ROOT).unwrap();
        }
        let report = m.power_cut(None);
        if fsync_root {
            assert_eq!(contents(&m, "d/f").unwrap(), b"x");
            assert_eq!(report.inodes_lost, 0);
        } else {
            assert_eq!(m.resolve("d"), None);
            assert_eq!(report.inodes_lost, 2);
            let lost = vec![PathBuf::from("d"), PathBuf::from("d/f")];
            assert_eq!(report.lost_paths, lost);
        }
    }
}

/// The checkpoint pattern: write a temporary file, fsync it, rename it over
/// the old file, fsync the directory.
fn replace_by_rename(m: &mut Model, body: &[u8], fsync_dir: bool) {
    let tmp = new_file(m, ROOT, "checkpoint.tmp");
    m.write(tmp, 0, body).unwrap();
    m.fsync(tmp).unwrap();
    m.rename(ROOT, os("checkpoint.tmp"), ROOT, os("checkpoint"), false)
        .unwrap();
    if fsync_dir {
        m.fsyncdir(ROOT).unwrap();
    }
}

#[test]
fn rename_over_a_file_is_durable_only_after_the_directory_fsync() {
    let mut m = Model::new();
    replace_by_rename(&mut m, b"v1", true);
    replace_by_rename(&mut m, b"v2", false);
    assert_eq!(contents(&m, "checkpoint").unwrap(), b"v2");
    m.power_cut(None);
    assert_eq!(contents(&m, "checkpoint").unwrap(), b"v1");
    assert_eq!(m.resolve("checkpoint.tmp"), None);

    replace_by_rename(&mut m, b"v3", true);
    m.power_cut(None);
    assert_eq!(contents(&m, "checkpoint").unwrap(), b"v3");
    assert_eq!(m.resolve("checkpoint.tmp"), None);
    // The replaced versions are gone from memory, not just from view.
    assert_eq!(m.inode_count(), 2);
}

#[test]
fn an_unlink_without_a_directory_fsync_comes_back() {
    let mut m = Model::new();
    let f = new_file(&mut m, ROOT, "f");
    m.write(f, 0, b"keep").unwrap();
    m.fsync(f).unwrap();
    m.fsyncdir(ROOT).unwrap();
    m.write(f, 4, b" not this").unwrap();
    m.unlink(ROOT, os("f")).unwrap();
    assert_eq!(m.resolve("f"), None);
    m.power_cut(None);
    assert_eq!(contents(&m, "f").unwrap(), b"keep");

    m.unlink(ROOT, os("f")).unwrap();
    m.fsyncdir(ROOT).unwrap();
    assert_eq!(m.inode_count(), 1, "a durably removed file is freed");
    m.power_cut(None);
    assert_eq!(m.resolve("f"), None);
}

#[test]
fn a_removed_file_lives_while_open_or_referenced() {
    let mut m = Model::new();
    let f = m.create(ROOT, os("f"), 0o644, 0, 0).unwrap().ino.0; // one lookup
    let fh = m.open(f).unwrap();
    m.write(f, 0, b"abc").unwrap();
    m.unlink(ROOT, os("f")).unwrap();
    assert_eq!(m.read(f, 0, 10).unwrap(), b"abc");
    m.release(fh);
    assert_eq!(
        m.read(f, 0, 10).unwrap(),
        b"abc",
        "the kernel still refers to it"
    );
    m.forget(f, 1);
    assert_eq!(m.read(f, 0, 10), Err(Errno::ENOENT));
    assert_eq!(m.open_handles(), 0);
}

#[test]
fn a_directory_removal_is_durable_only_after_the_parent_fsync() {
    let mut m = Model::new();
    let d = new_dir(&mut m, ROOT, "d");
    let f = new_file(&mut m, d, "f");
    m.fsync(f).unwrap();
    m.fsyncdir(d).unwrap();
    m.fsyncdir(ROOT).unwrap();
    m.unlink(d, os("f")).unwrap();
    assert_eq!(m.rmdir(ROOT, os("d")), Ok(()));
    m.power_cut(None);
    assert!(m.resolve("d/f").is_some(), "both removals were undone");

    let d = m.resolve("d").unwrap();
    m.unlink(d, os("f")).unwrap();
    m.fsyncdir(d).unwrap();
    m.rmdir(ROOT, os("d")).unwrap();
    m.fsyncdir(ROOT).unwrap();
    assert_eq!(m.inode_count(), 1);
    m.power_cut(None);
    assert_eq!(m.resolve("d"), None);
}

#[test]
fn a_move_between_directories_with_only_the_target_fsynced_leaves_two_names() {
    let mut m = Model::new();
    let a = new_dir(&mut m, ROOT, "a");
    let b = new_dir(&mut m, ROOT, "b");
    let f = new_file(&mut m, a, "f");
    m.write(f, 0, b"x").unwrap();
    m.fsync(f).unwrap();
    m.fsyncdir(a).unwrap();
    m.fsyncdir(ROOT).unwrap();
    m.rename(a, os("f"), b, os("g"), false).unwrap();
    m.fsyncdir(b).unwrap();
    m.power_cut(None);
    assert_eq!(contents(&m, "a/f").unwrap(), b"x");
    assert_eq!(contents(&m, "b/g").unwrap(), b"x");
    assert_eq!(m.getattr(m.resolve("b/g").unwrap()).unwrap().nlink, 2);
    // Removing both names frees it.
    let (a, b) = (m.resolve("a").unwrap(), m.resolve("b").unwrap());
    m.unlink(a, os("f")).unwrap();
    m.unlink(b, os("g")).unwrap();
    m.fsyncdir(a).unwrap();
    m.fsyncdir(b).unwrap();
    assert_eq!(m.inode_count(), 3);
}

#[test]
fn rename_checks_like_posix() {
    let mut m = Model::new();
    let d = new_dir(&mut m, ROOT, "d");
    let sub = new_dir(&mut m, d, "sub");
    new_file(&mut m, sub, "x");
    new_file(&mut m, ROOT, "f");
    new_dir(&mut m, ROOT, "empty");
    assert_eq!(
        m.rename(ROOT, os("d"), sub, os("d"), false),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        m.rename(ROOT, os("f"), ROOT, os("empty"), false),
        Err(Errno::EISDIR)
    );
    assert_eq!(
        m.rename(ROOT, os("empty"), ROOT, os("f"), false),
        Err(Errno::ENOTDIR)
    );
    assert_eq!(
        m.rename(ROOT, os("empty"), d, os("sub"), false),
        Err(Errno::ENOTEMPTY)
    );
    assert_eq!(
        m.rename(ROOT, os("nope"), ROOT, os("x"), false),
        Err(Errno::ENOENT)
    );
    assert_eq!(
        m.rename(ROOT, os("f"), sub, os("x"), true),
        Err(Errno::EEXIST)
    );
    assert_eq!(m.rmdir(ROOT, os("d")), Err(Errno::ENOTEMPTY));
    assert_eq!(m.unlink(ROOT, os("d")), Err(Errno::EISDIR));
    assert_eq!(m.rmdir(ROOT, os("f")), Err(Errno::ENOTDIR));
    assert_eq!(
        m.create(ROOT, os("f"), 0o644, 0, 0).map(|_| ()),
        Err(Errno::EEXIST)
    );
    // A directory moves over an empty one, and `..` follows it.
    m.rename(ROOT, os("empty"), d, os("moved"), false).unwrap();
    let moved = m.resolve("d/moved").unwrap();
    let names: Vec<(u64, OsString)> = m
        .readdir(moved)
        .unwrap()
        .into_iter()
        .map(|(i, _, n)| (i, n))
        .collect();
    assert_eq!(names, vec![(moved, ".".into()), (d, "..".into())]);
    assert_eq!(m.getattr(d).unwrap().nlink, 4);
}

#[test]
fn a_big_sparse_file_stays_cheap() {
    let mut m = Model::new();
    let f = new_file(&mut m, ROOT, "seg");
    m.fsyncdir(ROOT).unwrap();
    let gib = SetAttr {
        size: Some(1 << 30),
        ..SetAttr::default()
    };
    m.setattr(f, gib).unwrap();
    m.write(f, (1 << 30) - 3, b"end").unwrap();
    m.write(f, 1 << 29, b"middle").unwrap();
    m.fsync(f).unwrap();
    m.write(f, 0, b"start").unwrap();
    assert_eq!(m.allocated_pages(f), Some((3, 2)));
    assert_eq!(m.getattr(f).unwrap().blocks, 3 * 8);
    m.power_cut(None);
    assert_eq!(m.getattr(f).unwrap().size, 1 << 30);
    assert_eq!(m.allocated_pages(f), Some((2, 2)));
    assert_eq!(m.read(f, (1 << 30) - 3, 10).unwrap(), b"end");
    assert_eq!(m.read(f, 0, 5).unwrap(), vec![0; 5]);
    assert_eq!(m.fallocate(f, 1 << 31, 1, 0), Ok(()));
    assert_eq!(m.getattr(f).unwrap().size, (1 << 31) + 1);
    assert_eq!(m.allocated_pages(f), Some((2, 2)));
    assert_eq!(m.write(f, MAX_FILE_SIZE, b"x"), Err(Errno::EFBIG));
}

#[test]
fn bad_names_are_refused() {
    let mut m = Model::new();
    let long = "x".repeat(256);
    assert_eq!(
        m.create(ROOT, os(&long), 0o644, 0, 0).map(|_| ()),
        Err(Errno::ENAMETOOLONG)
    );
    assert_eq!(
        m.create(ROOT, os("a/b"), 0o644, 0, 0).map(|_| ()),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        m.create(ROOT, os("fifo"), 0o010_644, 0, 0).map(|_| ()),
        Err(Errno::EPERM)
    );
    assert_eq!(m.lookup(ROOT, os("none")).map(|_| ()), Err(Errno::ENOENT));
}
