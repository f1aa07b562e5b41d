//! `amazing-proxy top` used as a person would: in a real terminal (a tmux session of its own, on
//! a private socket), against a proxy with routes under load; the test reads the screen
//! (`capture-pane`) and presses keys (`send-keys`). The last screen is written to
//! `target/top-screen.txt` (docs/observability.md shows one). Needs tmux (`scripts/deps.sh
//! --tests`); without it the test says SKIP.

use std::process::{Command, Output};

use crate::support::http::*;
use crate::support::process::*;
use crate::support::tools::have;
use crate::support::{TEST_TIMEOUT, WAIT, bounded, eventually, skip};
use http::StatusCode;

/// A tmux server of the test's own, killed (with its sessions) on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("run tmux")
    }

    fn screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", "top"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        let out = self.run(&["send-keys", "-t", "top", keys]);
        assert!(out.status.success(), "send-keys {keys}: {out:?}");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// Waits until the screen has every one of `wanted`; returns it.
async fn screen_with(tmux: &Tmux, wanted: &[&str]) -> String {
    eventually("the screen to show what is wanted", WAIT, || async {
        let screen = tmux.screen();
        let missing: Vec<&&str> = wanted.iter().filter(|w| !screen.contains(**w)).collect();
        if missing.is_empty() {
            Ok(screen)
        } else {
            Err(format!("missing {missing:?} in:\n{screen}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_routes_and_peers_live_in_a_terminal() {
    const TEST: &str = "top::top_shows_routes_and_peers_live_in_a_terminal";
    if !have("tmux") {
        skip(
            TEST,
            "tmux is not installed (scripts/deps.sh --tests installs it)",
        );
        return;
    }
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let routes = dir.path().join("routes.yaml");
        std::fs::write(
            &routes,
            "inbound:\n  - name: echo\n    match: {pathPrefix: /echo}\n  \
             - name: statuses\n    match: {pathPrefix: /status}\n",
        )
        .expect("write the routes file");
        let routes = routes.display().to_string();
        let proxy = Proxy::start(app.addr, &["--routes", &routes]).await;
        let tmux = Tmux {
            socket: format!("ap-top-{}", std::process::id()),
        };
        let command = format!("{} top --admin {}", bin(), proxy.admin);
        let started = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "150",
            "-y",
            "40",
            &command,
        ]);
        assert!(started.status.success(), "tmux new-session: {started:?}");
        screen_with(
            &tmux,
            &["amazing-proxy top", "ROUTE", "RPS", "SUCCESS", "P99"],
        )
        .await;

        for _ in 0..40 {
            assert_eq!(proxy.get("/echo").await.status, StatusCode::OK);
        }
        for _ in 0..10 {
            let reply = proxy.get("/status/503").await;
            assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        }
        let screen = screen_with(
            &tmux,
            &["echo ", "statuses", "/status/503 503", "50 exchanges seen"],
        )
        .await;
        let line = |name: &str| {
            let found = screen.lines().find(|l| l.starts_with(name));
            found
                .unwrap_or_else(|| panic!("no {name} row:\n{screen}"))
                .to_owned()
        };
        assert!(line("echo ").contains(" 100.0% "), "{screen}");
        let statuses = line("statuses");
        assert!(
            statuses.contains(" 0.0% ") && !statuses.contains("100.0%"),
            "{screen}"
        );
        // The worst success rate on top once sorted by it.
        tmux.keys("s");
        let by_success = screen_with(&tmux, &["sorted by success"]).await;
        let row = |name: &str| {
            let found = by_success.lines().position(|l| l.starts_with(name));
            found.unwrap_or_else(|| panic!("no {name} row:\n{by_success}"))
        };
        assert!(
            row("statuses") < row("echo "),
            "statuses above echo:\n{by_success}"
        );
        // By peer: the one client address.
        tmux.keys("g");
        screen_with(&tmux, &["by peer", "PEER", "inbound from 127.0.0.1"]).await;
        let _ = std::fs::create_dir_all("target");
        let _ = std::fs::write("target/top-screen.txt", &screen);
        tmux.keys("q");
        eventually("top to quit on q", WAIT, || async {
            let out = tmux.run(&["has-session", "-t", "top"]);
            if out.status.success() {
                Err(tmux.screen())
            } else {
                Ok(())
            }
        })
        .await;
    })
    .await;
}
