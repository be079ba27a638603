//! Writes the man pages and shell completions from the clap definition in
//! `src/cli.rs` into `target/assets/`, where `cargo deb` packages them
//! (`[package.metadata.deb] assets` in Cargo.toml). So a plain `cargo deb`
//! builds a complete package, and the pages never drift from the CLI.
//!
//! cargo-deb reads assets from fixed paths, and a build script's `OUT_DIR`
//! has a hash in it, so the files go to `target/assets/` under the package
//! root (whatever `CARGO_TARGET_DIR` says: that is where the manifest points).
//!
//! That directory is outside what cargo caches, so the script also tells cargo
//! to rerun it when the directory changes or goes away (`rm -rf target/assets`
//! or `cargo clean -p` leave the build cache warm): cargo reruns a build script
//! when a `rerun-if-changed` path is missing or newer (its newest file, for a
//! directory) than the script's last start. What the script writes itself
//! would be newer, and rerun it (and so rebuild the crate) on the next build
//! too; so the files and the directory get the time of the newest input
//! instead, as old as what they are made from.
//!
//! Test builds with `NOTESD_TEST_VARIANT` (tests/build-variants.sh, their own
//! target dir, another version) write nothing here: they are never packaged,
//! and their pages would replace the package's under the same names.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::CommandFactory;
use clap_complete::Shell;

#[allow(dead_code)]
#[path = "src/cli.rs"]
mod cli;

/// What the files depend on (besides the environment and clap's version,
/// which cargo tracks itself).
const INPUTS: [&str; 2] = ["build.rs", "src/cli.rs"];

fn main() -> io::Result<()> {
    for input in INPUTS {
        println!("cargo:rerun-if-changed={input}");
    }
    println!("cargo:rerun-if-env-changed=NOTESD_BUILD_VERSION");
    println!("cargo:rerun-if-env-changed=NOTESD_TEST_VARIANT");
    if std::env::var_os("NOTESD_TEST_VARIANT").is_some_and(|v| !v.is_empty()) {
        return Ok(());
    }
    println!("cargo:rerun-if-changed=target/assets");
    let root =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "CARGO_MANIFEST_DIR is not set")
        })?);
    let out = root.join("target").join("assets");
    fs::create_dir_all(&out)?;
    let mut files = write_man_pages(&out)?;
    files.extend(write_completions(&out)?);
    remove_stale_man_pages(&out, &files)?;

    let mut inputs_time = SystemTime::UNIX_EPOCH;
    for input in INPUTS {
        inputs_time = inputs_time.max(fs::metadata(root.join(input))?.modified()?);
    }
    for file in &files {
        fs::File::options()
            .write(true)
            .open(file)?
            .set_modified(inputs_time)?;
    }
    // Last: writing and renaming in it made the directory new.
    fs::File::open(&out)?.set_modified(inputs_time)?;
    Ok(())
}

/// `notesd.1.gz`, `notesd-serve.1.gz`, … (hidden commands have none), as
/// `clap_mangen::generate_to` names them, compressed. Returns their paths.
fn write_man_pages(out: &Path) -> io::Result<Vec<PathBuf>> {
    let mut command = cli::Cli::command().disable_help_subcommand(true);
    command.build();
    let subcommands = command
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned();
    let pages: Vec<clap::Command> = std::iter::once(command.clone())
        .chain(subcommands)
        .collect();
    let mut files = Vec::new();
    for page in pages {
        let man = clap_mangen::Man::new(page);
        let mut roff = Vec::new();
        man.render(&mut roff)?;
        let path = out.join(format!("{}.gz", man.get_filename()));
        write_if_changed(&path, &gzip(&roff)?)?;
        files.push(path);
    }
    Ok(files)
}

fn write_completions(out: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for (shell, file) in [
        (Shell::Bash, "notesd.bash"),
        (Shell::Zsh, "_notesd"),
        (Shell::Fish, "notesd.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cli::Cli::command(), "notesd", &mut script);
        let path = out.join(file);
        write_if_changed(&path, &script)?;
        files.push(path);
    }
    Ok(files)
}

/// The page of a command that is gone (or now hidden): Cargo.toml packages
/// `target/assets/*.1.gz`.
fn remove_stale_man_pages(out: &Path, current: &[PathBuf]) -> io::Result<()> {
    for entry in fs::read_dir(out)? {
        let path = entry?.path();
        let is_page = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".1.gz") && !n.starts_with('.'));
        if is_page && !current.contains(&path) {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Best compression, no name and no time in the header: the same bytes every
/// build (as `gzip -9n`).
fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(data)?;
    gz.finish()
}

/// Through a temporary file and a rename, so that a concurrent build (another
/// target dir, the same `target/assets/`) or `cargo deb` never reads half a
/// file.
fn write_if_changed(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("asset");
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}
