//! `amazing-proxy top`: a full-screen, live view of a running proxy's traffic, by route or by
//! peer (requests per second, success rate, p50 and p99 latency, bytes per second over the last
//! 10 s, refreshed every second), with the slowest and the latest failing requests below. Keys:
//! `g` routes or peers, `s` the sort column, `q` (or Esc, Ctrl-C) quits. It reads `/tap` on the
//! admin listener (loopback only): `kubectl exec -it POD -c amazing-proxy -- amazing-proxy top`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table};

use super::stats::{GroupBy, Sample, SortBy, Stats, WINDOW};
use super::{Lines, ViewError};
use crate::sync::lock;

const REFRESH: Duration = Duration::from_secs(1);
/// Requests shown in each tail.
const TAIL: usize = 5;

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// The proxy's admin listener.
    #[arg(long, env = "AMAZING_PROXY_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Rows per route, or per peer (`g` switches).
    #[arg(long, value_parser = ["route", "peer"], default_value = "route")]
    pub by: String,
}

/// What the reader thread shares with the screen.
struct Shared {
    stats: Stats,
    /// Why the stream ended, once it has.
    ended: Option<String>,
}

pub fn main(args: TopArgs) -> Result<(), ViewError> {
    let shared = Arc::new(Mutex::new(Shared {
        stats: Stats::new(Instant::now()),
        ended: None,
    }));
    // The stream is read on a thread of its own; its first answer (the stream, or why not)
    // comes back before the screen is taken, so that an error prints as usual.
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let reader = shared.clone();
    let admin = args.admin;
    std::thread::Builder::new()
        .name("tap-reader".into())
        .spawn(move || read_stream(admin, &reader, &opened_tx))
        .map_err(ViewError::Runtime)?;
    match opened_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            let reason = "the reader stopped before it opened the stream".into();
            return Err(ViewError::Stream { admin, reason });
        }
    }
    let by = if args.by == "peer" {
        GroupBy::Peer
    } else {
        GroupBy::Route
    };
    let mut terminal = ratatui::try_init().map_err(ViewError::Terminal)?;
    let shown = show(&mut terminal, &shared, admin, by);
    ratatui::try_restore().map_err(ViewError::Terminal)?;
    shown
}

/// Reads `/tap` into `shared` until it ends; says first whether it opened.
fn read_stream(
    admin: SocketAddr,
    shared: &Mutex<Shared>,
    opened: &std::sync::mpsc::Sender<Result<(), ViewError>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = opened.send(Err(ViewError::Runtime(e)));
            return;
        }
    };
    runtime.block_on(async {
        let mut lines = match Lines::open(admin, "").await {
            Ok(lines) => {
                let _ = opened.send(Ok(()));
                lines
            }
            Err(e) => {
                let _ = opened.send(Err(e));
                return;
            }
        };
        loop {
            let line = match lines.next().await {
                Ok(line) => line,
                Err(e) => {
                    lock(shared).ended = Some(e.to_string());
                    return;
                }
            };
            let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let mut shared = lock(shared);
            if let Some(dropped) = record.get("dropped").and_then(serde_json::Value::as_u64) {
                shared.stats.dropped += dropped;
            } else if let Some(sample) = Sample::from_record(&record, Instant::now()) {
                shared.stats.add(sample);
            }
        }
    });
}

/// Draws every [`REFRESH`] (and at once after a key) until a quit key.
fn show(
    terminal: &mut ratatui::DefaultTerminal,
    shared: &Mutex<Shared>,
    admin: SocketAddr,
    mut by: GroupBy,
) -> Result<(), ViewError> {
    let mut sort = SortBy::Requests;
    loop {
        {
            let mut shared = lock(shared);
            let now = Instant::now();
            shared.stats.prune(now);
            terminal
                .draw(|frame| draw(frame, &shared, admin, by, sort, now))
                .map_err(ViewError::Terminal)?;
        }
        if !event::poll(REFRESH).map_err(ViewError::Terminal)? {
            continue;
        }
        let Event::Key(key) = event::read().map_err(ViewError::Terminal)? else {
            continue;
        };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
            KeyCode::Char('g') => by = by.other(),
            KeyCode::Char('s') => sort = sort.next(),
            _ => {}
        }
    }
}

fn draw(
    frame: &mut Frame<'_>,
    shared: &Shared,
    admin: SocketAddr,
    by: GroupBy,
    sort: SortBy,
    now: Instant,
) {
    let stats = &shared.stats;
    let [title, table, tails, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(5),
        Constraint::Length(TAIL as u16 + 2),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let bold = Style::default().add_modifier(Modifier::BOLD);
    frame.render_widget(
        Paragraph::new(Line::styled(
            format!(
                "amazing-proxy top  {admin}  by {}  sorted by {}  (g: routes/peers, s: sort, q: quit)",
                by.title().to_lowercase(),
                sort.name()
            ),
            bold,
        )),
        title,
    );

    let header = Row::new([by.title(), "RPS", "SUCCESS", "P50", "P99", "BYTES/S"]).style(bold);
    let rows = stats.rows(now, by, sort).into_iter().map(|row| {
        let colour = if row.success >= 0.99 {
            Color::Green
        } else if row.success >= 0.9 {
            Color::Yellow
        } else {
            Color::Red
        };
        Row::new([
            Cell::from(row.name),
            Cell::from(format!("{:.1}", row.requests_per_second)),
            Cell::from(format!("{:.1}%", row.success * 100.0)).style(Style::default().fg(colour)),
            Cell::from(format!("{:.1}ms", row.p50_ms)),
            Cell::from(format!("{:.1}ms", row.p99_ms)),
            Cell::from(bytes(row.bytes_per_second)),
        ])
    });
    let widths = [
        Constraint::Fill(1),
        Constraint::Length(10),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(10),
    ];
    frame.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::default().borders(Borders::TOP)),
        table,
    );

    let [slowest, failing] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(tails);
    let list = |samples: Vec<&Sample>| -> Vec<Line<'static>> {
        samples
            .into_iter()
            .map(|s| Line::raw(s.summary.clone()))
            .collect()
    };
    frame.render_widget(
        Paragraph::new(list(stats.slowest(TAIL)))
            .block(Block::default().borders(Borders::TOP).title("slowest")),
        slowest,
    );
    frame.render_widget(
        Paragraph::new(list(stats.failing(TAIL)))
            .style(Style::default().fg(Color::Red))
            .block(Block::default().borders(Borders::TOP).title("failing")),
        failing,
    );

    let mut status = format!(
        "window {} s, {} exchanges seen",
        WINDOW.as_secs(),
        stats.seen
    );
    if stats.dropped > 0 {
        status.push_str(&format!(", {} not shown (fell behind)", stats.dropped));
    }
    if let Some(why) = &shared.ended {
        status.push_str(&format!("; stream ended: {why}"));
    }
    frame.render_widget(Paragraph::new(status), footer);
}

/// Bytes per second for a person.
fn bytes(per_second: f64) -> String {
    match per_second {
        b if b >= 1e9 => format!("{:.1}G", b / 1e9),
        b if b >= 1e6 => format!("{:.1}M", b / 1e6),
        b if b >= 1e3 => format!("{:.1}k", b / 1e3),
        b => format!("{b:.0}"),
    }
}
