//! Writes the man pages and shell completions from the clap definition in
//! `src/cli.rs` into `target/assets/`, where `cargo deb` packages them
//! (`[package.metadata.deb] assets` in Cargo.toml). So a plain `cargo deb`
//! builds a complete package, and the pages never drift from the CLI.
//!
//! cargo-deb reads assets from fixed paths, and a build script's `OUT_DIR`
//! has a hash in it, so the files go to `target/assets/` under the package
//! root (whatever `CARGO_TARGET_DIR` says: that is where the manifest points).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

#[allow(dead_code)]
#[path = "src/cli.rs"]
mod cli;

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed=src/cli.rs");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NOTESD_BUILD_VERSION");
    let root =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "CARGO_MANIFEST_DIR is not set")
        })?);
    let out = root.join("target").join("assets");
    fs::create_dir_all(&out)?;
    write_man_pages(&out)?;
    write_completions(&out)?;
    Ok(())
}

/// `notesd.1.gz`, `notesd-serve.1.gz`, … (hidden commands have none), as
/// `clap_mangen::generate_to` names them, compressed.
fn write_man_pages(out: &Path) -> io::Result<()> {
    let mut command = cli::Cli::command().disable_help_subcommand(true);
    command.build();
    let subcommands = command
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned();
    let pages: Vec<clap::Command> = std::iter::once(command.clone())
        .chain(subcommands)
        .collect();
    for page in pages {
        let man = clap_mangen::Man::new(page);
        let mut roff = Vec::new();
        man.render(&mut roff)?;
        let path = out.join(format!("{}.gz", man.get_filename()));
        write_if_changed(&path, &gzip(&roff)?)?;
    }
    Ok(())
}

fn write_completions(out: &Path) -> io::Result<()> {
    for (shell, file) in [
        (Shell::Bash, "notesd.bash"),
        (Shell::Zsh, "_notesd"),
        (Shell::Fish, "notesd.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cli::Cli::command(), "notesd", &mut script);
        write_if_changed(&out.join(file), &script)?;
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

fn write_if_changed(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    fs::write(path, bytes)
}
