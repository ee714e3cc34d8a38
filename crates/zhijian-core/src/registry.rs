//! Methods by name: one explicit registration line per method.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::method::{Method, Stage};

/// Builds a method from its TOML table (the `method` key already removed).
pub type Factory = fn(&toml::Table) -> Result<Box<dyn Method>>;

/// One registered method.
#[derive(Clone)]
pub struct Entry {
    /// Name used in configs.
    pub name: &'static str,
    /// Stage it belongs to.
    pub stage: Stage,
    /// One line for `zhijian methods`.
    pub summary: &'static str,
    factory: Factory,
}

/// The known methods.
#[derive(Clone, Default)]
pub struct Registry {
    entries: BTreeMap<&'static str, Entry>,
}

impl Registry {
    /// An empty registry; each method family adds itself with its `register`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a method. A second registration of the same name is a programming error.
    pub fn register(&mut self, name: &'static str, stage: Stage, summary: &'static str, factory: Factory) {
        let previous = self.entries.insert(name, Entry { name, stage, summary, factory });
        assert!(previous.is_none(), "method `{name}` registered twice");
    }

    /// Every entry, by name.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Every name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.entries.keys().map(|s| s.to_string()).collect()
    }

    /// Builds the method a config entry `{ method = "lora", rank = 8, … }` describes.
    pub fn build(&self, spec: &toml::Table) -> Result<Box<dyn Method>> {
        let name = match spec.get("method") {
            Some(toml::Value::String(s)) => s.as_str(),
            _ => return Err(Error::Config(format!("a method entry needs `method = \"<name>\"`; got {spec}"))),
        };
        let entry = self.entries.get(name).ok_or_else(|| Error::UnknownMethod { name: name.into(), known: self.names() })?;
        let mut rest = spec.clone();
        rest.remove("method");
        (entry.factory)(&rest)
    }

    /// Builds a method by name with its default config.
    pub fn build_default(&self, name: &str) -> Result<Box<dyn Method>> {
        let mut spec = toml::Table::new();
        spec.insert("method".into(), toml::Value::String(name.into()));
        self.build(&spec)
    }
}

/// Parses a method's config, naming the method in the error. Config structs use
/// `#[serde(deny_unknown_fields)]`, so a misspelt field names itself.
pub fn parse_config<T: DeserializeOwned>(method: &str, table: &toml::Table) -> Result<T> {
    from_table(table).map_err(|message| Error::MethodConfig { method: method.into(), message })
}

/// Deserialises a TOML table into `T`. On failure the message quotes the
/// offending `key = value` line: serde's own message names an unknown or
/// missing field, but not the field whose value has the wrong type or range.
pub fn from_table<T: DeserializeOwned>(table: &toml::Table) -> std::result::Result<T, String> {
    let text = toml::to_string(table).map_err(|e| e.to_string())?;
    toml::from_str(&text).map_err(|e: toml::de::Error| {
        let message = e.message().trim_end();
        match e.span() {
            Some(span) => {
                let start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
                let end = text[span.start..].find('\n').map_or(text.len(), |i| span.start + i);
                let line = text[start..end].trim();
                // A value inside a sub-table (`[a.b]`, then `x = 1`) names only its own key: the
                // header names the field whose value it is (an enum given a table, `b = { x = 1 }`).
                let header = text[..start].lines().rev().find(|l| l.trim_start().starts_with('[')).filter(|_| !line.starts_with('['));
                let within = header.map(|h| format!(" in `{}`", h.trim())).unwrap_or_default();
                format!("`{line}`{within}: {message}{}", keys_of_header(table, line, message))
            }
            None => message.to_string(),
        }
    })
}

/// For a field missing from the table a header line (`[a.b]`) opens, the
/// keys that table does have: the misspelling of the missing field (a tagged
/// table's `kind` written `knid`) is among them, and serde names neither.
fn keys_of_header(table: &toml::Table, line: &str, message: &str) -> String {
    let Some(path) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) else { return String::new() };
    if !message.starts_with("missing field") {
        return String::new();
    }
    let mut at = table;
    for part in path.split('.') {
        match at.get(part.trim().trim_matches('"')) {
            Some(toml::Value::Table(t)) => at = t,
            _ => return String::new(),
        }
    }
    let keys: Vec<String> = at.keys().map(|k| format!("`{k}`")).collect();
    if keys.is_empty() { String::new() } else { format!(" (the table has {})", keys.join(", ")) }
}

/// Serialises a method's config back to TOML (for records and round-trips).
pub fn config_table<T: serde::Serialize>(config: &T) -> toml::Table {
    match toml::Value::try_from(config) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        size: u32,
        inner: Inner,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        mode: Mode,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        Fast,
    }

    /// A bad value is quoted with its line; inside a sub-table, with the
    /// header too, which names the field the value belongs to.
    #[test]
    fn errors_quote_the_line_and_the_table_it_is_in() {
        let parse = |text: &str| from_table::<Outer>(&text.parse::<toml::Table>().unwrap()).unwrap_err();
        let e = parse("size = -1\ninner = { mode = \"fast\" }");
        assert!(e.starts_with("`size = -1`:"), "{e}");
        // An enum given a table: serde sees only `x = 1`; the header says it is `mode`.
        let e = parse("size = 1\ninner = { mode = { x = 1 } }");
        assert!(e.contains("`x = 1` in `[inner.mode]`"), "{e}");
    }
}
