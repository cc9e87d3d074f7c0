//! `rootfork nbd attach`'s own parsers (main.rs `parse_attach`: the direct reading of
//! `cmd::nbd_attach_argv`, else the attach-only clap parser) against the full command tree: the
//! same commands reach them, with the same arguments, values and errors.

use std::ffi::OsString;

use clap::{CommandFactory, Parser};

use super::{parse_attach, AttachCli, Cli, Command, NbdCommand};

fn argv(words: &[&str]) -> Vec<OsString> {
    words.iter().map(OsString::from).collect()
}

/// The attach arguments as the full parser reads them.
fn full(words: &[&str]) -> Result<super::cmd::nbd_attach::Args, clap::Error> {
    match Cli::try_parse_from(argv(words))?.command {
        Command::Nbd(NbdCommand::Attach(a)) => Ok(a),
        other => panic!("not an attach: {other:?}"),
    }
}

#[test]
fn only_nbd_attach_takes_the_short_parser() {
    for words in [
        &["rootfork"][..],
        &["rootfork", "nbd"],
        &["rootfork", "nbd", "list"],
        &["rootfork", "nbd", "serve", "--template", "t"],
        &["rootfork", "attach", "nbd"],
        &["rootfork", "template", "list"],
        &["rootfork", "--help"],
    ] {
        assert!(parse_attach(argv(words)).is_none(), "{words:?}");
    }
}

#[test]
fn the_short_parser_reads_what_the_full_one_reads() {
    for words in [
        &["rootfork", "nbd", "attach", "--template", "/t.img"][..],
        &[
            "rootfork",
            "nbd",
            "attach",
            "--template",
            "/t.img",
            "--connections",
            "4",
            "--sandbox",
            "s1",
            "--cache-dir",
            "/c",
            "--lock-dir",
            "/l",
            "--timeout",
            "7",
            "--block-size",
            "4096",
            "--dead-conn-timeout",
            "9",
            "--instance",
            "i-1",
            "--no-reclaim",
        ],
        &[
            "rootfork",
            "nbd",
            "attach",
            "--no-reclaim",
            "--connections",
            "+2",
            "--template",
            "t",
        ],
        &[
            "rootfork",
            "nbd",
            "attach",
            "--template=/t.img",
            "--timeout=0",
        ],
        &[
            "rootfork",
            "nbd",
            "attach",
            "--template",
            "t",
            "--sandbox",
            "",
        ],
    ] {
        let short = parse_attach(argv(words))
            .expect("an attach")
            .expect("parses");
        let long = full(words).expect("parses");
        assert_eq!(format!("{short:?}"), format!("{long:?}"), "{words:?}");
    }
}

#[test]
fn the_short_parser_refuses_what_the_full_one_refuses() {
    for words in [
        &["rootfork", "nbd", "attach"][..],
        &[
            "rootfork",
            "nbd",
            "attach",
            "--template",
            "t",
            "--connections",
            "x",
        ],
        &["rootfork", "nbd", "attach", "--template", "t", "--bogus"],
        &["rootfork", "nbd", "attach", "--template", "t", "extra"],
        &[
            "rootfork",
            "nbd",
            "attach",
            "--template",
            "a",
            "--template",
            "b",
        ],
        &[
            "rootfork",
            "nbd",
            "attach",
            "--template",
            "t",
            "--no-reclaim",
            "--no-reclaim",
        ],
        &[
            "rootfork",
            "nbd",
            "attach",
            "--template",
            "t",
            "--connections",
            "4294967296",
        ],
        &[
            "rootfork",
            "nbd",
            "attach",
            "--template",
            "t",
            "--timeout",
            "-1",
        ],
        &["rootfork", "nbd", "attach", "--template", "t", "--sandbox"],
        &["rootfork", "nbd", "attach", "--template", "t", "--help"],
        &["rootfork", "nbd", "attach", "--no-reclaim"],
        &["rootfork", "nbd", "attach", "--template", ""],
    ] {
        let short = parse_attach(argv(words))
            .expect("an attach")
            .expect_err("refused");
        let long = full(words).expect_err("refused");
        assert_eq!(short.kind(), long.kind(), "{words:?}");
    }
}

#[test]
fn the_short_parser_has_the_same_arguments_and_about() {
    let tree = Cli::command();
    let attach = tree
        .find_subcommand("nbd")
        .and_then(|n| n.find_subcommand("attach"))
        .expect("nbd attach in the tree")
        .clone();
    let short = AttachCli::command();
    let ids = |c: &clap::Command| {
        let mut v: Vec<String> = c
            .get_arguments()
            .map(|a| format!("{} {:?} {:?}", a.get_id(), a.get_long(), a.get_env()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(ids(&short), ids(&attach));
    assert_eq!(
        short.get_about().map(|a| a.to_string()),
        attach.get_about().map(|a| a.to_string())
    );
}

#[test]
fn usual_argument_lists_skip_clap_and_odd_ones_do_not() {
    use super::cmd::nbd_attach_argv::parse;
    for words in [
        &["--template", "/t.img"][..],
        &[
            "--template",
            "/t.img",
            "--sandbox",
            "bench",
            "--connections",
            "2",
        ],
        &[
            "--no-reclaim",
            "--template",
            "t",
            "--instance",
            "x",
            "--block-size",
            "4096",
        ],
    ] {
        assert!(parse(&argv(words)).is_some(), "{words:?}");
    }
    for words in [
        &[][..],
        &["--template=/t.img"],
        &["--template", "t", "--help"],
        &["--template", "t", "-h"],
        &["--template", "t", "--sandbox", "-x"],
        &["--template", "t", "--connections", "many"],
        &["--template", "t", "--", "x"],
        &["t"],
    ] {
        assert!(parse(&argv(words)).is_none(), "{words:?}");
    }
}
