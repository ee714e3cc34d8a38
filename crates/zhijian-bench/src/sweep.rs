//! Sweeps: a grid of values for strategy fields, each combination run as a
//! strategy of its own under the experiment's protocol.
//!
//! An axis is written `STRATEGY.PATH=V1,V2,…`: `PATH` is `train.FIELD` (a
//! field of the strategy's budget) or `methods.I.FIELD` (a field of its
//! `I`-th method entry); `STRATEGY` is a strategy's name or `*` for every
//! strategy. Values are TOML (`1e-4`, `8`, `true`, `"query"`, `["query",
//! "value"]`), a bare word being a string. A strategy with axes becomes one
//! strategy per combination, named `NAME FIELD=V …`; the others run as they
//! are, as baselines.

use std::str::FromStr;

use zhijian_core::{Error, Registry, Result};

use crate::experiment::{Experiment, Strategy};

/// One axis of a sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct Axis {
    /// Strategy name, or `*` for all.
    pub strategy: String,
    /// Where the value goes.
    pub field: Field,
    /// The values, as written and as parsed.
    pub values: Vec<(String, toml::Value)>,
}

/// A field of a strategy an axis sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    /// A field of the strategy's `train` overrides.
    Train(String),
    /// A field of its `index`-th method entry.
    Method {
        /// Position in `methods`.
        index: usize,
        /// The field.
        name: String,
    },
}

impl Field {
    fn name(&self) -> &str {
        match self {
            Field::Train(n) | Field::Method { name: n, .. } => n,
        }
    }
}

impl FromStr for Axis {
    type Err = Error;

    fn from_str(s: &str) -> Result<Axis> {
        let bad = |why: &str| {
            Error::Config(format!("sweep axis `{s}`: {why}; write STRATEGY.train.FIELD=V1,V2 or STRATEGY.methods.I.FIELD=V1,V2 (STRATEGY may be *)"))
        };
        let (path, values) = s.split_once('=').ok_or_else(|| bad("no `=`"))?;
        let parts: Vec<&str> = path.trim().split('.').collect();
        let field = match parts.as_slice() {
            [_, "train", name] => Field::Train(name.to_string()),
            [_, "methods", index, name] => Field::Method { index: index.parse().map_err(|_| bad("the method index is not a number"))?, name: name.to_string() },
            _ => return Err(bad("unknown field path")),
        };
        let values: Vec<(String, toml::Value)> = split_top_level(values).into_iter().map(|v| (v.to_string(), parse_value(v))).collect();
        if values.iter().any(|(v, _)| v.is_empty()) {
            return Err(bad("an empty value"));
        }
        Ok(Axis { strategy: parts[0].to_string(), field, values })
    }
}

/// Splits at commas outside brackets and quotes.
fn split_top_level(s: &str) -> Vec<&str> {
    let (mut depth, mut quoted, mut start, mut out) = (0i32, false, 0, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '[' | '{' if !quoted => depth += 1,
            ']' | '}' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out
}

/// A TOML value, or the text as a string when it is not one (`query`).
fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}")).ok().and_then(|mut t| t.remove("v")).unwrap_or_else(|| toml::Value::String(text.to_string()))
}

/// The experiment with every strategy that has axes replaced by one strategy
/// per combination of their values (in axis order, the last varying fastest),
/// checked like an experiment file: an unknown strategy, a method index out of
/// range or a misspelt field is an error naming it.
pub fn expand(exp: &Experiment, axes: &[Axis], registry: &Registry) -> Result<Experiment> {
    if axes.is_empty() {
        return Err(Error::Config("a sweep needs at least one axis (--vary)".into()));
    }
    for a in axes {
        if a.strategy != "*" && !exp.strategies.iter().any(|s| s.name == a.strategy) {
            let known: Vec<&str> = exp.strategies.iter().map(|s| s.name.as_str()).collect();
            return Err(Error::Config(format!("sweep axis names strategy `{}`; the experiment has {}", a.strategy, known.join(", "))));
        }
    }
    let mut strategies = Vec::new();
    for s in &exp.strategies {
        let mine: Vec<&Axis> = axes.iter().filter(|a| a.strategy == "*" || a.strategy == s.name).collect();
        let mut variants = vec![s.clone()];
        for axis in mine {
            let mut next = Vec::with_capacity(variants.len() * axis.values.len());
            for v in &variants {
                for (text, value) in &axis.values {
                    next.push(set(v, axis, text, value)?);
                }
            }
            variants = next;
        }
        strategies.extend(variants);
    }
    let swept = Experiment { strategies, ..exp.clone() };
    swept.check(registry)?;
    Ok(swept)
}

fn set(s: &Strategy, axis: &Axis, text: &str, value: &toml::Value) -> Result<Strategy> {
    let mut out = s.clone();
    match &axis.field {
        Field::Train(name) => {
            out.train.insert(name.clone(), value.clone());
        }
        Field::Method { index, name } => {
            let n = out.methods.len();
            let entry = out
                .methods
                .get_mut(*index)
                .ok_or_else(|| Error::Config(format!("sweep axis sets methods.{index} of strategy `{}`, which has {n} method(s)", s.name)))?;
            entry.insert(name.clone(), value.clone());
        }
    }
    out.name = format!("{} {}={text}", out.name, axis.field.name());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXP: &str = r#"
name = "s"
[backbone]
kind = "small_cnn"
[data]
kind = "mnist"
[[strategy]]
name = "probe"
methods = [{ method = "linear_probe" }]
[[strategy]]
name = "lora"
methods = [{ method = "lora", rank = 4 }]
train = { lr = 1e-3 }
"#;

    fn names(e: &Experiment) -> Vec<&str> {
        e.strategies.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn axes_expand_into_named_variants() {
        let registry = crate::registry();
        let exp: Experiment = toml::from_str(EXP).unwrap();
        let axes: Vec<Axis> =
            ["lora.train.lr=1e-4, 1e-3", "lora.methods.0.targets=[\"query\", \"value\"],all_linear"].iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(axes[1].values[0].1, toml::Value::Array(vec!["query".into(), "value".into()]));
        assert_eq!(axes[1].values[1].1, toml::Value::String("all_linear".into()));
        let rank: Axis = "*.methods.0.rank=2,8".parse().unwrap();
        assert_eq!(rank.values.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(), [toml::Value::Integer(2), toml::Value::Integer(8)]);
        let swept = expand(&exp, &["lora.train.lr=1e-4,1e-2".parse().unwrap(), "lora.methods.0.rank=2,8".parse().unwrap()], &registry).unwrap();
        assert_eq!(names(&swept), ["probe", "lora lr=1e-4 rank=2", "lora lr=1e-4 rank=8", "lora lr=1e-2 rank=2", "lora lr=1e-2 rank=8"]);
        let last = &swept.strategies[4];
        assert_eq!((last.train["lr"].as_float(), last.methods[0]["rank"].as_integer()), (Some(1e-2), Some(8)));
        assert_eq!(exp.strategies[1].methods[0]["rank"].as_integer(), Some(4), "the experiment itself is unchanged");
        // `*` varies every strategy.
        let all = expand(&exp, &["*.train.epochs=1,2".parse().unwrap()], &registry).unwrap();
        assert_eq!(names(&all), ["probe epochs=1", "probe epochs=2", "lora epochs=1", "lora epochs=2"]);
    }

    #[test]
    fn bad_axes_name_the_problem() {
        let registry = crate::registry();
        let exp: Experiment = toml::from_str(EXP).unwrap();
        let err = |axis: &str| match axis.parse::<Axis>() {
            Ok(a) => expand(&exp, &[a], &registry).unwrap_err().to_string(),
            Err(e) => e.to_string(),
        };
        assert!(err("lora.lr=1").contains("unknown field path"));
        assert!(err("lora.train.lr").contains("no `=`"));
        assert!(err("lora.methods.x.rank=1").contains("not a number"));
        assert!(err("lora.train.lr=1e-3,").contains("empty value"));
        let e = err("lorra.train.lr=1e-3");
        assert!(e.contains("`lorra`") && e.contains("probe, lora"), "{e}");
        assert!(err("lora.methods.1.rank=2").contains("has 1 method"));
        let e = err("lora.methods.0.rnak=2");
        assert!(e.contains("rnak"), "{e}");
        let e = err("lora.train.learning_rate=1e-3");
        assert!(e.contains("learning_rate"), "{e}");
        assert!(expand(&exp, &[], &registry).unwrap_err().to_string().contains("at least one axis"));
    }
}
