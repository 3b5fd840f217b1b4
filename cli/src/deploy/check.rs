//! Checks the whole plan against the server before anything is changed, so that `apply` does
//! not create the first files' resources and then fail on a later one: names and subjects the
//! server refuses, subjects that overlap another stream's, consumers whose filter is outside
//! their stream, bucket settings, replicas a lone server cannot hold, and the account's stream
//! limit.
//!
//! What the server can only judge by trying (its disk, a cluster's placement, ...) is not
//! known here: `apply` then says exactly what it applied and what it did not.

use super::plan::{Item, Step};
use anyhow::{Context, Result};
use async_nats::jetstream::{self, stream};
use futures::TryStreamExt;
use jetfn::wire::names;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A resource the server would refuse, and why.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The file that declares it.
    pub file: PathBuf,
    /// `stream NAME`, `kv BUCKET`, `consumer STREAM/NAME`.
    pub label: String,
    /// Why.
    pub reason: String,
}

/// A stream as the plan leaves it: its name and subjects.
struct Planned<'a> {
    name: String,
    subjects: Vec<String>,
    /// The item that creates or updates it, if the plan does.
    item: Option<&'a Item>,
    /// Mirrors and sourced streams take their messages from elsewhere.
    external: bool,
}

/// Every refusal the plan would meet; empty when it may be applied.
pub async fn check(
    client: &async_nats::Client,
    js: &jetstream::Context,
    items: &[Item],
) -> Result<Vec<Refusal>> {
    let existing: Vec<stream::Info> = js
        .streams()
        .try_collect()
        .await
        .context("listing the streams on the server")?;
    let mut streams: BTreeMap<String, Planned<'_>> = existing
        .iter()
        .map(|info| {
            let planned = Planned {
                name: info.config.name.clone(),
                subjects: subjects_of(&info.config),
                item: None,
                external: is_external(&info.config),
            };
            (info.config.name.clone(), planned)
        })
        .collect();
    let mut refusals = Vec::new();
    let mut refuse = |item: &Item, reason: String| {
        refusals.push(Refusal {
            file: item.file.clone(),
            label: item.label.clone(),
            reason,
        })
    };

    let clustered = client.server_info().cluster.is_some();
    let replicas = |item: &Item, replicas: usize, refuse: &mut dyn FnMut(&Item, String)| {
        if replicas > 1 && !clustered {
            refuse(
                item,
                format!(
                    "num_replicas {replicas}: the server is not part of a cluster and keeps \
                     one copy only"
                ),
            );
        }
    };

    // Streams and buckets first: consumers are judged against what the plan leaves.
    for item in items {
        let planned = match &item.step {
            Step::CreateStream(config) | Step::UpdateStream(config) => {
                if let Err(why) = check_stream_name(&config.name) {
                    refuse(item, why);
                }
                replicas(item, config.num_replicas, &mut refuse);
                Planned {
                    name: config.name.clone(),
                    subjects: subjects_of(config),
                    item: Some(item),
                    external: is_external(config),
                }
            }
            Step::CreateKv(config) => {
                if let Err(why) = check_bucket(&config.bucket, config.history) {
                    refuse(item, why);
                }
                replicas(item, config.num_replicas, &mut refuse);
                Planned {
                    name: names::kv_stream(&config.bucket),
                    subjects: vec![names::kv_subject(&config.bucket, ">")],
                    item: Some(item),
                    external: false,
                }
            }
            _ => continue,
        };
        for subject in &planned.subjects {
            if let Err(why) = check_subject(subject) {
                refuse(item, format!("subject {subject:?}: {why}"));
            }
        }
        streams.insert(planned.name.clone(), planned);
    }

    // Two streams may not store the same subject.
    let all: Vec<&Planned<'_>> = streams.values().collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            let Some((subject, other)) = first_overlap(&a.subjects, &b.subjects) else {
                continue;
            };
            // Say it on the side the plan changes (both, when it changes both).
            for (planned, them) in [(a, b), (b, a)] {
                if let Some(item) = planned.item {
                    let how = if them.item.is_some() {
                        "declared by another file"
                    } else {
                        "on the server"
                    };
                    refuse(
                        item,
                        format!(
                            "subject {subject} overlaps {other} of stream {} ({how}); \
                             a subject can be stored by one stream only",
                            them.name
                        ),
                    );
                }
            }
        }
    }

    for item in items {
        let (stream_name, config) = match &item.step {
            Step::CreateConsumer(stream, config) | Step::UpdateConsumer(stream, config) => {
                (stream, config)
            }
            _ => continue,
        };
        if let Some(name) = &config.durable_name
            && let Err(why) = check_stream_name(name)
        {
            refuse(item, format!("durable_name: {why}"));
        }
        let Some(stream) = streams.get(stream_name.as_str()) else {
            refuse(
                item,
                format!("stream {stream_name} does not exist and no file declares it"),
            );
            continue;
        };
        let filters = std::iter::once(&config.filter_subject)
            .chain(&config.filter_subjects)
            .filter(|f| !f.is_empty());
        for filter in filters {
            if let Err(why) = check_subject(filter) {
                refuse(item, format!("filter subject {filter:?}: {why}"));
            } else if !stream.external
                && first_overlap(std::slice::from_ref(filter), &stream.subjects).is_none()
            {
                refuse(
                    item,
                    format!(
                        "filter subject {filter} matches none of the subjects of stream \
                         {stream_name} ({})",
                        stream.subjects.join(", ")
                    ),
                );
            }
        }
    }

    let new_streams = items
        .iter()
        .filter(|i| matches!(i.step, Step::CreateStream(_) | Step::CreateKv(_)));
    let account = js
        .query_account()
        .await
        .context("reading the JetStream account's limits")?;
    if let Some(limit) = account.limits.max_streams.filter(|n| *n >= 0) {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        for (n, item) in new_streams.enumerate() {
            if account.streams.saturating_add(n + 1) > limit {
                refuse(
                    item,
                    format!(
                        "the account may hold {limit} streams and has {} already",
                        account.streams
                    ),
                );
            }
        }
    }
    Ok(refusals)
}

/// Mirrors and sourced streams take their messages from other streams.
fn is_external(config: &stream::Config) -> bool {
    config.mirror.is_some() || config.sources.as_ref().is_some_and(|s| !s.is_empty())
}

/// A stream's subjects; a stream without any stores its own name.
fn subjects_of(config: &stream::Config) -> Vec<String> {
    if config.subjects.is_empty() && !is_external(config) {
        vec![config.name.clone()]
    } else {
        config.subjects.clone()
    }
}

/// The first pair `(a, b)` of subjects some message subject would match both of.
fn first_overlap<'a>(ours: &'a [String], theirs: &'a [String]) -> Option<(&'a str, &'a str)> {
    ours.iter().find_map(|a| {
        theirs
            .iter()
            .find(|b| overlap(a, b))
            .map(|b| (a.as_str(), b.as_str()))
    })
}

/// Whether some subject matches both patterns (`*` one token, `>` one or more at the end).
pub fn overlap(a: &str, b: &str) -> bool {
    let (mut a, mut b) = (a.split('.'), b.split('.'));
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == y || x == "*" || y == "*" => {}
            _ => return false,
        }
    }
}

/// A subject (pattern) the server accepts: non-empty tokens, no spaces, wildcards as whole
/// tokens, `>` last.
fn check_subject(subject: &str) -> Result<(), String> {
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err("has an empty token".into());
        }
        if token.chars().any(char::is_whitespace) {
            return Err("has white space".into());
        }
        let wildcard = token.contains(['*', '>']);
        if wildcard && token.len() > 1 {
            return Err(format!("{token:?}: * and > must be whole tokens"));
        }
        if *token == ">" && i + 1 != tokens.len() {
            return Err("> must be the last token".into());
        }
    }
    Ok(())
}

/// A stream or consumer name: no spaces, dots, wildcards or path separators.
fn check_stream_name(name: &str) -> Result<(), String> {
    let bad = |c: char| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\');
    if name.is_empty() || name.chars().any(bad) {
        return Err(format!(
            "{name:?} is not a valid name (no spaces, '.', '*', '>', '/' or '\\')"
        ));
    }
    Ok(())
}

/// A bucket name (`[A-Za-z0-9_-]+`) and its history (1 to 64 revisions).
fn check_bucket(bucket: &str, history: i64) -> Result<(), String> {
    let valid = !bucket.is_empty()
        && bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(format!("bucket {bucket:?} must match [A-Za-z0-9_-]+"));
    }
    if !(1..=64).contains(&history) {
        return Err(format!(
            "history {history}: a bucket keeps 1 to 64 revisions"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_overlap_when_one_message_subject_matches_both() {
        for (a, b) in [
            ("a.b", "a.b"),
            ("a.*", "a.b"),
            ("a.>", "a.b.c"),
            ("*.b", "a.*"),
            (">", "x"),
            ("a.*.c", "a.>"),
        ] {
            assert!(overlap(a, b) && overlap(b, a), "{a} ~ {b}");
        }
        for (a, b) in [
            ("a.b", "a.c"),
            ("a.*", "a.b.c"),
            ("a.>", "a"),
            ("a.*", "b.>"),
        ] {
            assert!(!overlap(a, b) && !overlap(b, a), "{a} !~ {b}");
        }
    }

    #[test]
    fn subjects_need_whole_wildcard_tokens_and_a_final_greater_than() {
        for good in ["evt.account.*", "jetfn.dlq.>", "a", "*.b"] {
            assert_eq!(check_subject(good), Ok(()), "{good}");
        }
        for bad in ["", "a..b", "a.b*", "a.>.b", "a b", "a.>x"] {
            assert!(check_subject(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_and_buckets_follow_the_server_rules() {
        assert!(check_stream_name("ACCOUNT_EVENTS").is_ok());
        for bad in ["", "A.B", "A B", "A*", "a/b"] {
            assert!(check_stream_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_bucket("jetfn-ledger-account", 1).is_ok());
        assert!(check_bucket("bad.bucket", 1).is_err());
        assert!(check_bucket("b", 0).is_err() && check_bucket("b", 65).is_err());
    }
}
