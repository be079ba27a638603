//! The command line: `check` (config validation, like `nginx -t`), `--help`,
//! and usage errors. No server is started here.

mod common;

use common::*;

/// Writes `text` to `DIR/notesd.toml` and runs `notesd check -c FILE`.
fn check(dir: &TempDir, text: &str) -> CmdOutput {
    let path = dir.join("notesd.toml");
    std::fs::write(&path, text).expect("write config");
    let path = path.display().to_string();
    run_notesd(&["check", "-c", path.as_str()])
}

#[test]
fn check_accepts_a_valid_config() {
    let dir = TempDir::new("check_ok");
    let text = render_config(&ServerPaths::in_dir(dir.path()), &TestOptions::default());
    let out = check(&dir, &text);
    assert_eq!(
        out.code,
        Some(0),
        "valid config:\n{text}\n{}",
        out.describe()
    );
}

#[test]
fn check_lists_every_problem_with_its_key() {
    let text = r#"[server]
bind = ["unix:/tmp/notesd-check-test.sock"]
workers = -1
bogus = 1

[database]
url = "mysql://x"

[log]
format = "xml"
"#;
    let out = check(&TempDir::new("check_bad"), text);
    assert_eq!(
        out.code,
        Some(2),
        "invalid config exits 2: {}",
        out.describe()
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    let mut found_on = Vec::new();
    for key in [
        "server.workers",
        "server.bogus",
        "database.url",
        "log.format",
    ] {
        let line = lines
            .iter()
            .position(|l| l.contains(key))
            .unwrap_or_else(|| {
                panic!(
                    "stderr must name `{key}` (every problem is listed, not just the first): {}",
                    out.describe()
                )
            });
        found_on.push((key, line));
    }
    let mut distinct: Vec<usize> = found_on.iter().map(|(_, l)| *l).collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        4,
        "one problem per line, each naming its key ({found_on:?}): {}",
        out.describe()
    );
}

#[test]
fn check_rejects_a_toml_syntax_error() {
    let out = check(&TempDir::new("check_syntax"), "[server\nworkers = 2\n");
    assert_eq!(
        out.code,
        Some(2),
        "syntax error exits 2: {}",
        out.describe()
    );
    assert!(
        !out.stderr.trim().is_empty(),
        "and says why: {}",
        out.describe()
    );
}

#[test]
fn check_rejects_a_missing_file() {
    let dir = TempDir::new("check_missing");
    let path = dir.join("missing.toml").display().to_string();
    let out = run_notesd(&["check", "-c", path.as_str()]);
    assert_eq!(
        out.code,
        Some(2),
        "missing file exits 2: {}",
        out.describe()
    );
    assert!(
        out.stderr.contains("missing.toml"),
        "the message names the file: {}",
        out.describe()
    );
}

#[test]
fn check_finds_the_config_through_notesd_config() {
    let dir = TempDir::new("check_env");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        render_config(&ServerPaths::in_dir(dir.path()), &TestOptions::default()),
    )
    .expect("write config");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[server]\nworkers = \"many\"\n").expect("write config");

    let mut cmd = notesd_cmd(["check"]);
    cmd.env("NOTESD_CONFIG", &good);
    let out = run_with_timeout(cmd, CMD_TIMEOUT);
    assert_eq!(out.code, Some(0), "NOTESD_CONFIG=good: {}", out.describe());

    let mut cmd = notesd_cmd(["check"]);
    cmd.env("NOTESD_CONFIG", &bad);
    let out = run_with_timeout(cmd, CMD_TIMEOUT);
    assert_eq!(out.code, Some(2), "NOTESD_CONFIG=bad: {}", out.describe());
    assert!(out.stderr.contains("server.workers"), "{}", out.describe());
}

/// Subcommand names from clap's `Commands:` section.
fn listed_commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.trim_start().starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .map(|s| s.trim_end_matches(',').to_string())
        .collect()
}

#[test]
fn help_lists_the_public_commands_only() {
    let out = run_notesd(&["--help"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let commands = listed_commands(&out.stdout);
    for cmd in ["serve", "migrate", "seed", "check", "status", "healthcheck"] {
        assert!(
            commands.iter().any(|c| c == cmd),
            "--help lists `{cmd}` (found {commands:?}): {}",
            out.describe()
        );
    }
    assert!(
        !commands.iter().any(|c| c == "worker"),
        "`worker` is internal and hidden from --help: {}",
        out.describe()
    );
}

#[test]
fn unknown_flags_are_usage_errors() {
    for args in [&["--no-such-flag"][..], &["check", "--no-such-flag"][..]] {
        let out = run_notesd(args);
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.describe());
        assert!(
            !out.stderr.trim().is_empty(),
            "{args:?}: {}",
            out.describe()
        );
    }
    let out = run_notesd(&["no-such-command"]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
}
