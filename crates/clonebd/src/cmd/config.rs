//! `clonebd run --config FILE`: the same settings as `run`'s flags, from a TOML file.
//!
//! Each key is one of `run`'s long options, spelled as the flag (`hydration-threshold`) or
//! with underscores (`hydration_threshold`); a switch takes `true` or `false`. The file's
//! settings become flags placed before the command line's, and a flag given on the command
//! line overrides the file's setting for it. An unknown key, a switch given a value, or a
//! value the flag refuses is an error naming the file and the key, before anything starts.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use clap::{Arg, CommandFactory};

use super::Cli;

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("config {}: {why}", .path.display())]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub why: String,
}

/// `argv` with the settings of `run --config FILE` put in as flags (unchanged without it).
pub fn expand(argv: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    if argv.get(1).map(OsString::as_os_str) != Some(OsStr::new("run")) {
        return Ok(argv);
    }
    let Some(path) = config_path(&argv[2..]) else {
        return Ok(argv);
    };
    let err = |why: String| ConfigError {
        path: path.clone(),
        why,
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| err(clonebd_core::errno::describe(&e)))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| err(e.to_string().trim_end().replace('\n', " ")))?;
    let cli = Cli::command();
    let run = cli
        .find_subcommand("run")
        .ok_or_else(|| err("this clonebd has no run command".to_string()))?;
    // What the command line sets itself is not taken from the file (run's options are all
    // long ones, given as `--name VALUE` or `--name=VALUE`).
    let on_command_line = |long: &str| {
        let flag = format!("--{long}");
        let with_value = format!("--{long}=");
        argv[2..]
            .iter()
            .take_while(|a| *a != "--")
            .filter_map(|a| a.to_str())
            .any(|a| a == flag || a.starts_with(&with_value))
    };
    let mut flags: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let arg = run
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
            .ok_or_else(|| {
                err(format!(
                    "unknown key `{key}`: the keys are run's long options, as `hydration-threshold = 64` (see clonebd run --help)"
                ))
            })?;
        let words = words(arg, &long, value).map_err(|why| err(format!("`{key}`: {why}")))?;
        if !on_command_line(&long) {
            flags.extend(words);
        }
    }
    // Each value as the flag itself would check it, naming the file.
    let mut alone: Vec<OsString> = vec!["clonebd".into(), "run".into()];
    alone.extend(flags.iter().cloned());
    if let Err(e) = Cli::command().try_get_matches_from(&alone)
        && e.kind() != clap::error::ErrorKind::MissingRequiredArgument
    {
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or_default();
        return Err(err(first.trim_start_matches("error: ").to_string()));
    }
    let mut out: Vec<OsString> = argv[..2].to_vec();
    out.extend(flags);
    out.extend(argv[2..].iter().cloned());
    Ok(out)
}

/// The value of `--config` among `run`'s arguments.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            return None;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// The command-line words for `long = value`.
fn words(arg: &Arg, long: &str, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let flag = OsString::from(format!("--{long}"));
    if !arg.get_action().takes_values() {
        return match value {
            toml::Value::Boolean(true) => Ok(vec![flag]),
            toml::Value::Boolean(false) => Ok(Vec::new()),
            _ => Err("a switch: write true or false".to_string()),
        };
    }
    let scalar = |v: &toml::Value| match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(_) => Err(format!(
            "takes a value (--{long} {}), not true or false",
            arg.get_value_names()
                .and_then(|n| n.first())
                .map_or("VALUE".to_string(), ToString::to_string)
        )),
        _ => Err("takes one value: a string or a number".to_string()),
    };
    Ok(vec![flag, OsString::from(scalar(value)?)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    fn with_config(text: &str, rest: &[&str]) -> Result<Vec<String>, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let p = dir.path().join("clone.toml");
        std::fs::write(&p, text).map_err(|e| e.to_string())?;
        let mut a = argv(&["clonebd", "run", "--config", p.to_str().unwrap_or_default()]);
        a.extend(argv(rest));
        expand(a)
            .map(|v| {
                v.into_iter()
                    .map(|w| w.to_string_lossy().into_owned())
                    .collect()
            })
            .map_err(|e| e.why)
    }

    #[test]
    fn settings_become_flags_and_the_command_line_wins() {
        let out = with_config(
            "source = \"/dev/vg/snap\"\ndest = \"/dev/nvme0n1p3\"\nhydration_threshold = 64\nno-discard-passdown = true\nno-hydration = false\n",
            &["--hydration-threshold", "8"],
        )
        .expect("expands");
        let joined = out.join(" ");
        assert!(joined.contains("--source /dev/vg/snap"), "{joined}");
        assert!(joined.contains("--dest /dev/nvme0n1p3"), "{joined}");
        assert!(joined.contains("--no-discard-passdown"), "{joined}");
        assert!(!joined.contains("--no-hydration"), "{joined}");
        // The command line's threshold, once; the file's is dropped.
        assert_eq!(
            out.iter().filter(|w| *w == "--hydration-threshold").count(),
            1
        );
        assert!(joined.ends_with("--hydration-threshold 8"), "{joined}");
    }

    #[test]
    fn bad_keys_and_values_are_refused_by_name() {
        let e = with_config("hydration-treshold = 64\n", &[]).expect_err("typo");
        assert!(e.starts_with("unknown key `hydration-treshold`"), "{e}");
        let e = with_config("no-hydration = \"yes\"\n", &[]).expect_err("switch");
        assert_eq!(e, "`no-hydration`: a switch: write true or false");
        let e = with_config("hydration-threshold = \"many\"\n", &[]).expect_err("value");
        assert!(
            e.contains("invalid value 'many' for '--hydration-threshold"),
            "{e}"
        );
        let e = with_config("source = true\n", &[]).expect_err("bool for a value");
        assert!(e.starts_with("`source`: takes a value (--source"), "{e}");
        let e = with_config("source = \n", &[]).expect_err("not toml");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn hydration_priority_is_a_setting_too() {
        let out = with_config("hydration-priority = \"background\"\n", &[]).expect("expands");
        assert!(
            out.join(" ").contains("--hydration-priority background"),
            "{out:?}"
        );
        let e = with_config("hydration_priority = \"fast\"\n", &[]).expect_err("value");
        assert!(
            e.contains("invalid value 'fast' for '--hydration-priority"),
            "{e}"
        );
    }

    #[test]
    fn other_commands_and_no_config_are_left_alone() {
        let a = argv(&["clonebd", "status", "--config", "x"]);
        assert_eq!(expand(a.clone()).expect("as is"), a);
        let a = argv(&["clonebd", "run", "--source", "s"]);
        assert_eq!(expand(a.clone()).expect("as is"), a);
    }
}
