//! A real headless Chromium driven through WebDriver, for the dashboard's
//! browser tests: [`Browser::start`] runs Debian's `chromedriver` on a free
//! loopback port and opens a session with `chromium --headless=new`;
//! [`Dashboard`] is a `txmq dashboard` process to point it at.
//!
//! Both are found on `PATH` (or through `TXMQ_CHROMIUM` and
//! `TXMQ_CHROMEDRIVER`); [`Browser::missing`] names what is not there, so a
//! test can skip with that message (`.ci/run` installs them).
//!
//! Everything started here is killed on drop: chromedriver runs in a
//! process group of its own that is killed as a whole, and any Chromium
//! process still running with this browser's profile directory (one that
//! left the group) is killed by its pid.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;

use crate::{binary, free_port};

/// The flags Chromium runs with: headless, no sandbox (CI runs as root),
/// a fixed window so screenshots are comparable.
pub const CHROMIUM_FLAGS: [&str; 4] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--window-size=1280,900",
];

/// A program found on `PATH` (or the path in `env_var`), trying `names` in order.
fn find_program(env_var: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

fn chromium_path() -> Option<PathBuf> {
    find_program("TXMQ_CHROMIUM", &["chromium", "chromium-browser"])
}

fn chromedriver_path() -> Option<PathBuf> {
    find_program("TXMQ_CHROMEDRIVER", &["chromedriver"])
}

/// Where screenshots go: `target/dashboard-screenshots/` of the target
/// directory in use (`CARGO_TARGET_DIR`, else the workspace's `target/`).
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("dashboard-screenshots")
}

/// Waits until something accepts connections on `addr`, or `child` exits
/// (an error naming `what` and `log`'s text), or 20 s pass.
fn wait_listening(child: &mut Child, addr: &str, what: &str, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{what} exited with {status}; log:\n{}", log_text()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what} did not listen on {addr}; log:\n{}",
                log_text()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn kill_pid(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// The pids of processes whose command line mentions `needle`.
fn pids_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// chromedriver, a headless Chromium session and its WebDriver client.
pub struct Browser {
    client: Option<Client>,
    driver: Option<Child>,
    /// Chromium's profile directory; also how its processes are found.
    profile: tempfile::TempDir,
    _log_dir: tempfile::TempDir,
}

impl Browser {
    /// What is missing to run a browser test (`None` when both programs are
    /// there): say, "chromedriver (Debian package chromium-driver)".
    pub fn missing() -> Option<String> {
        let mut missing = Vec::new();
        if chromium_path().is_none() {
            missing.push("chromium (Debian package chromium, or set TXMQ_CHROMIUM)");
        }
        if chromedriver_path().is_none() {
            missing.push("chromedriver (Debian package chromium-driver, or set TXMQ_CHROMEDRIVER)");
        }
        (!missing.is_empty()).then(|| missing.join(" and "))
    }

    /// Starts chromedriver on a free loopback port and opens a headless
    /// Chromium session.
    ///
    /// # Panics
    /// When a program is missing (check [`Browser::missing`] first), or
    /// chromedriver or Chromium does not start (with chromedriver's log).
    pub async fn start() -> Browser {
        let chromium = chromium_path().expect("chromium found (check Browser::missing)");
        let chromedriver = chromedriver_path().expect("chromedriver found");
        let log_dir = tempfile::tempdir().expect("temp dir");
        let profile = tempfile::tempdir().expect("temp dir");
        let log = log_dir.path().join("chromedriver.log");
        let port = free_port();
        let mut driver = {
            use std::os::unix::process::CommandExt;
            Command::new(&chromedriver)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .arg("--allowed-ips=127.0.0.1")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Its own process group: killed as a whole on drop, with
                // the Chromium processes it started.
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", chromedriver.display()))
        };
        let addr = format!("127.0.0.1:{port}");
        let mut browser = Browser {
            client: None,
            driver: None,
            profile,
            _log_dir: log_dir,
        };
        let listening = wait_listening(&mut driver, &addr, "chromedriver", &log);
        browser.driver = Some(driver);
        if let Err(e) = listening {
            panic!("{e}");
        }

        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| s.to_string()).collect();
        args.push(format!(
            "--user-data-dir={}",
            browser.profile.path().display()
        ));
        args.push("--no-first-run".into());
        args.push("--disable-dev-shm-usage".into());
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "binary": chromium.display().to_string(), "args": args }),
        );
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(caps);
        let client = match builder.connect(&format!("http://{addr}")).await {
            Ok(c) => c,
            Err(e) => panic!(
                "no Chromium session through chromedriver: {e}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        };
        browser.client = Some(client);
        browser
    }

    /// The WebDriver client.
    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("a session")
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) {
        self.client()
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// The first element matching the CSS `selector`, waiting up to 10 s
    /// for it (panics naming the selector and the page otherwise).
    pub async fn find(&self, selector: &str) -> Element {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.client().find(Locator::Css(selector)).await {
                Ok(e) => return e,
                Err(e) if Instant::now() > deadline => {
                    let url = self.client().current_url().await.map(|u| u.to_string());
                    let text = self.body_text().await;
                    panic!("no {selector} on {url:?}: {e}\npage text:\n{text}");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Whether an element matches `selector` now (no waiting).
    pub async fn exists(&self, selector: &str) -> bool {
        self.client()
            .find_all(Locator::Css(selector))
            .await
            .map(|v| !v.is_empty())
            .unwrap_or(false)
    }

    /// The text of the element matching `selector` (waiting for it).
    pub async fn text(&self, selector: &str) -> String {
        let e = self.find(selector).await;
        e.text()
            .await
            .unwrap_or_else(|err| panic!("text of {selector}: {err}"))
    }

    /// The page's visible text (empty if it cannot be read), for messages.
    pub async fn body_text(&self) -> String {
        match self.client().find(Locator::Css("body")).await {
            Ok(b) => b.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Sets the value of `form`'s field `name` (clearing it first).
    pub async fn fill(&self, form: &str, name: &str, value: &str) {
        let field = self.find(&format!("{form} [name=\"{name}\"]")).await;
        field
            .clear()
            .await
            .unwrap_or_else(|e| panic!("clear {form} {name}: {e}"));
        field
            .send_keys(value)
            .await
            .unwrap_or_else(|e| panic!("type into {form} {name}: {e}"));
    }

    /// Clicks the element matching `selector` and waits until the page
    /// that the click leads to has loaded (`document.readyState`).
    pub async fn click(&self, selector: &str) {
        let e = self.find(selector).await;
        e.click()
            .await
            .unwrap_or_else(|err| panic!("click {selector}: {err}"));
        self.wait_loaded().await;
    }

    /// Waits (up to 10 s) until the document has loaded.
    pub async fn wait_loaded(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = self
                .client()
                .execute("return document.readyState", vec![])
                .await;
            if matches!(&state, Ok(s) if s == "complete") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the page never finished loading: {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a screenshot of the window as
    /// `target/dashboard-screenshots/NAME.png`; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .client()
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Ends the WebDriver session (Chromium exits), then chromedriver.
    pub async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.close()).await;
        }
        // Drop kills chromedriver and anything left.
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(mut driver) = self.driver.take() {
            // The negative pid names the process group.
            let _ = Command::new("kill")
                .args(["-KILL", "--"])
                .arg(format!("-{}", driver.id()))
                .stderr(Stdio::null())
                .status();
            let _ = driver.kill();
            let _ = driver.wait();
        }
        // Chromium processes that moved to a group of their own still run
        // with this profile directory on their command line.
        let profile = self.profile.path().display().to_string();
        for pid in pids_mentioning(&profile) {
            kill_pid(pid, "KILL");
        }
    }
}

/// A `txmq dashboard` process listening on a free loopback port; killed
/// (SIGKILL) when dropped.
pub struct Dashboard {
    child: Option<Child>,
    /// Its base URL, `http://127.0.0.1:PORT`.
    pub url: String,
    log: PathBuf,
}

impl Dashboard {
    /// Starts `txmq --nameserver NAMESERVER dashboard --listen 127.0.0.1:PORT`
    /// plus `extra` flags, logging to `log`; waits until it listens.
    pub fn start(nameserver: &str, extra: &[&str], log: &Path) -> Dashboard {
        let addr = format!("127.0.0.1:{}", free_port());
        let log_file =
            std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let mut child = Command::new(binary("txmq"))
            .arg("--nameserver")
            .arg(nameserver)
            .arg("dashboard")
            .arg("--listen")
            .arg(&addr)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("start txmq dashboard: {e}"));
        if let Err(e) = wait_listening(&mut child, &addr, "txmq dashboard", log) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{e}");
        }
        Dashboard {
            child: Some(child),
            url: format!("http://{addr}"),
            log: log.to_path_buf(),
        }
    }

    /// `self.url` followed by `path` (which starts with `/`).
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The dashboard's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
