//! A YAML walker that records problems with their key paths instead of stopping at the first one.
//! Getters always return a value (the default, or a placeholder after a problem) so parsing carries on.

use serde_yaml::{Mapping, Value};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

/// One problem in a config file, with the key path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

pub struct Section<'a> {
    path: String,
    map: Option<&'a Mapping>,
    problems: &'a RefCell<Vec<Problem>>,
}

impl<'a> Section<'a> {
    pub fn root(value: &'a Value, problems: &'a RefCell<Vec<Problem>>) -> Self {
        let s = Section {
            path: String::new(),
            map: value.as_mapping(),
            problems,
        };
        if s.map.is_none() && !value.is_null() {
            s.problem_here("the file must be a YAML mapping");
        }
        s
    }

    fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub fn problem(&self, key: &str, message: &str) {
        self.problems.borrow_mut().push(Problem {
            path: self.key_path(key),
            message: message.to_string(),
        });
    }

    pub fn problem_here(&self, message: &str) {
        let path = if self.path.is_empty() {
            "(root)".to_string()
        } else {
            self.path.clone()
        };
        self.problems.borrow_mut().push(Problem {
            path,
            message: message.to_string(),
        });
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.and_then(|m| m.get(key)).filter(|v| !v.is_null())
    }

    /// A nested mapping. A missing required section is reported; the returned section is then empty.
    pub fn section(&self, key: &str, required: bool) -> Section<'a> {
        let value = self.get(key);
        let map = match value {
            Some(Value::Mapping(m)) => Some(m),
            Some(_) => {
                self.problem(key, "must be a mapping");
                None
            }
            None => {
                if required {
                    self.problem(key, "is required");
                }
                None
            }
        };
        Section {
            path: self.key_path(key),
            map,
            problems: self.problems,
        }
    }

    pub fn optional_section(&self, key: &str) -> Option<Section<'a>> {
        self.get(key)?;
        Some(self.section(key, false))
    }

    /// Records a problem with a path of the caller's choosing (cross-item checks).
    pub fn problems_push(&self, p: Problem) {
        self.problems.borrow_mut().push(p);
    }

    /// The key path of this section (`policies[2].match`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether the key is present (and not null).
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The raw value of a key, for shapes the typed getters do not cover.
    pub fn raw(&self, key: &str) -> Option<&'a Value> {
        self.get(key)
    }

    /// A list of mappings; each item becomes a section with path `key[i]`. Non-mapping items are
    /// reported and skipped.
    pub fn items(&self, key: &str) -> Vec<Section<'a>> {
        let mut out = Vec::new();
        match self.get(key) {
            Some(Value::Sequence(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let path = format!("{}[{i}]", self.key_path(key));
                    match item {
                        Value::Mapping(m) => out.push(Section {
                            path,
                            map: Some(m),
                            problems: self.problems,
                        }),
                        other => self.problems.borrow_mut().push(Problem {
                            path,
                            message: format!("must be a mapping, got {}", describe(other)),
                        }),
                    }
                }
            }
            Some(other) => self.problem(
                key,
                &format!("must be a list of mappings, got {}", describe(other)),
            ),
            None => {}
        }
        out
    }

    /// Reports every key of this section that is not in `known`.
    pub fn finish(&self, known: &[&str]) {
        let Some(map) = self.map else { return };
        for k in map.keys() {
            match k.as_str() {
                Some(name) if known.contains(&name) => {}
                Some(name) => self.problem(
                    name,
                    &format!("unknown key (expected one of: {})", known.join(", ")),
                ),
                None => self.problem_here(&format!("non-string key {k:?}")),
            }
        }
    }

    pub fn string(&self, key: &str, default: Option<&str>) -> String {
        match self.get(key) {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::String(_)) => {
                self.problem(key, "must not be empty");
                String::new()
            }
            Some(_) => {
                self.problem(key, "must be a string");
                String::new()
            }
            None => match default {
                Some(d) => d.to_string(),
                None => {
                    self.problem(key, "is required");
                    String::new()
                }
            },
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> bool {
        match self.get(key) {
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                self.problem(
                    key,
                    &format!("must be true or false, got {}", describe(other)),
                );
                default
            }
            None => default,
        }
    }

    pub fn optional_string(&self, key: &str) -> Option<String> {
        self.get(key)?;
        let s = self.string(key, None);
        (!s.is_empty()).then_some(s)
    }

    pub fn int(&self, key: &str, default: Option<i64>, min: i64, max: i64) -> i64 {
        match self.get(key) {
            Some(Value::Number(n)) => match n.as_i64() {
                Some(v) if (min..=max).contains(&v) => v,
                _ => {
                    self.problem(
                        key,
                        &format!("must be an integer from {min} to {max}, got {n}"),
                    );
                    min
                }
            },
            Some(other) => {
                self.problem(key, &format!("must be an integer, got {}", describe(other)));
                min
            }
            None => match default {
                Some(d) => d,
                None => {
                    self.problem(key, "is required");
                    min
                }
            },
        }
    }

    pub fn millis(&self, key: &str, default: u64, min: u64, max: u64) -> Duration {
        let v = self.int(key, Some(default as i64), min as i64, max as i64);
        Duration::from_millis(v as u64)
    }

    /// A list of strings, each checked by `check` (which returns a problem message).
    pub fn string_list(
        &self,
        key: &str,
        required: bool,
        check: impl Fn(&str) -> Option<String>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        match self.get(key) {
            Some(Value::Sequence(items)) => {
                if items.is_empty() && required {
                    self.problem(key, "must list at least one entry");
                }
                for (i, item) in items.iter().enumerate() {
                    match item.as_str() {
                        Some(s) => match check(s) {
                            None => out.push(s.to_string()),
                            Some(msg) => self.problem(&format!("{key}[{i}]"), &msg),
                        },
                        None => self.problem(&format!("{key}[{i}]"), "must be a string"),
                    }
                }
            }
            Some(_) => self.problem(key, "must be a list of strings"),
            None if required => self.problem(key, "is required"),
            None => {}
        }
        out
    }

    /// A mapping from integer keys to integer values within [min, max].
    pub fn int_map(&self, key: &str, min: i64, max: i64) -> Option<BTreeMap<i32, i64>> {
        let value = self.get(key)?;
        let Some(map) = value.as_mapping() else {
            self.problem(key, "must be a mapping of node id to port");
            return Some(BTreeMap::new());
        };
        if map.is_empty() {
            self.problem(key, "must map at least one node id");
        }
        let mut out = BTreeMap::new();
        for (k, v) in map {
            let node = k
                .as_i64()
                .or_else(|| k.as_str().and_then(|s| s.parse().ok()))
                .and_then(|n| i32::try_from(n).ok());
            let Some(node) = node else {
                self.problem(
                    &format!("{key}.{}", describe(k)),
                    "key must be a node id (integer)",
                );
                continue;
            };
            match v.as_i64() {
                Some(p) if (min..=max).contains(&p) => {
                    out.insert(node, p);
                }
                _ => self.problem(
                    &format!("{key}.{node}"),
                    &format!("must be an integer from {min} to {max}"),
                ),
            }
        }
        Some(out)
    }
}

pub fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(_) => "a tagged value".into(),
    }
}

/// `host:port` with a port from 1 to 65535 (IPv6 in brackets).
pub fn check_host_port(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("'{:.80}' is not host:port", s));
    };
    if host.is_empty() || host == "[]" {
        return Err(format!("'{:.80}' has no host", s));
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    check_host(bare)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("'{:.80}' has an invalid port", s)),
    }
}

/// The longest host name DNS allows.
pub const MAX_HOST_BYTES: usize = 253;

/// An IP address, or a DNS host name: at most 253 bytes of dot-separated labels of 1 to 63 letters,
/// digits, hyphens (and underscores, which container platforms use), none starting or ending with a
/// hyphen.
pub fn check_host(host: &str) -> Result<(), String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let shown = || format!("'{:.80}{}'", host, if host.len() > 80 { "…" } else { "" });
    if host.is_empty() || host.len() > MAX_HOST_BYTES {
        return Err(format!(
            "{} is not a host name (1 to {MAX_HOST_BYTES} bytes)",
            shown()
        ));
    }
    let ok = host.trim_end_matches('.').split('.').all(|label| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is not a host name (labels of letters, digits and hyphens) or an IP address",
            shown()
        ))
    }
}

/// Config files larger than this are refused before they are read whole.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// Deepest nesting of mappings and lists a config file may have (the real layout needs 6).
pub const MAX_NESTING: usize = 32;

/// How deeply `text` nests, from its indentation and flow brackets, without parsing it: a YAML parser
/// fed thousands of nested `{` takes time quadratic in the depth, so the depth is checked first.
/// Over-estimates rather than under-estimates (a bracket inside a quoted string counts unless the
/// quote is closed on the same line), which only matters past [`MAX_NESTING`].
pub fn nesting_depth(text: &str) -> usize {
    let mut deepest = 0;
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    for line in text.lines() {
        let trimmed = line.trim_start_matches(' ');
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        if flow == 0 {
            while indents.last().is_some_and(|&i| i > indent) {
                indents.pop();
            }
            if indents.last().is_none_or(|&i| i < indent) {
                indents.push(indent);
            }
        }
        // "- - - x": each dash opens a level of its own.
        let dashes = trimmed
            .split_inclusive(' ')
            .take_while(|w| w.trim_end() == "-")
            .count();
        let mut quote: Option<char> = None;
        for c in trimmed.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, '#') => break,
                (None, '{' | '[') => {
                    flow += 1;
                    deepest = deepest.max(indents.len() + dashes + flow);
                }
                (None, '}' | ']') => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
        deepest = deepest.max(indents.len() + dashes + flow);
    }
    deepest
}

/// The bytes of the regular file at `path`, if it holds at most `limit`: a device, a FIFO or a larger
/// file is refused before anything is buffered, and one that grows while it is read is refused too
/// (the config, certificate, key, token and password files all come through here).
pub fn read_bounded(path: &std::path::Path, limit: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > limit {
        return Err(format!("{} bytes; at most {limit} allowed", meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("grew past {limit} bytes while being read"));
    }
    Ok(bytes)
}
