//! Choosing hook sites by pattern, as PEFT's `target_modules` does.

use regex::Regex;

use crate::error::{Error, Result};
use crate::layers::Site;

/// Sites matching any of `patterns`, in forward order. A pattern is an exact
/// path (`encoder.layer.0.attention.self.query`), a dot-suffix (`query`,
/// `self.value`) or a regex over the whole path written `re:<regex>`.
/// A pattern matching nothing is an error that lists the sites.
pub fn select_sites(patterns: &[String], sites: &[Site]) -> Result<Vec<Site>> {
    let mut chosen = vec![false; sites.len()];
    for pattern in patterns {
        let matches: Box<dyn Fn(&str) -> bool> = match pattern.strip_prefix("re:") {
            Some(re) => {
                let re = Regex::new(&format!("^(?:{re})$")).map_err(|e| Error::Config(format!("bad target regex `{re}`: {e}")))?;
                Box::new(move |path: &str| re.is_match(path))
            }
            None => Box::new(move |path: &str| path == pattern || path.ends_with(&format!(".{pattern}"))),
        };
        let mut any = false;
        for (i, site) in sites.iter().enumerate() {
            if matches(&site.path) {
                chosen[i] = true;
                any = true;
            }
        }
        if !any {
            return Err(Error::NoMatchingSites { pattern: pattern.clone(), sites: sites.iter().map(|s| s.path.clone()).collect() });
        }
    }
    Ok(sites.iter().zip(chosen).filter(|(_, c)| *c).map(|(s, _)| s.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Role;

    fn sites() -> Vec<Site> {
        ["l.0.attn.query", "l.0.attn.value", "l.1.attn.query", "l.1.attn.value", "head"].iter().map(|p| Site::new(p.to_string(), 4, 4, Role::Other)).collect()
    }

    fn paths(patterns: &[&str]) -> Result<Vec<String>> {
        let patterns: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
        Ok(select_sites(&patterns, &sites())?.into_iter().map(|s| s.path).collect())
    }

    #[test]
    fn exact_suffix_and_regex() {
        assert_eq!(paths(&["head"]).unwrap(), ["head"]);
        assert_eq!(paths(&["query"]).unwrap(), ["l.0.attn.query", "l.1.attn.query"]);
        assert_eq!(paths(&["attn.value", "l.0.attn.query"]).unwrap(), ["l.0.attn.query", "l.0.attn.value", "l.1.attn.value"]);
        assert_eq!(paths(&["re:l\\.1\\..*"]).unwrap(), ["l.1.attn.query", "l.1.attn.value"]);
        // A suffix must end at a dot boundary: `uery` is not `query`.
        assert!(paths(&["uery"]).is_err());
    }

    #[test]
    fn unmatched_pattern_lists_the_sites() {
        let err = paths(&["qkv"]).unwrap_err();
        assert!(matches!(&err, Error::NoMatchingSites { sites, .. } if sites.len() == 5));
        assert!(err.to_string().contains("l.0.attn.query"), "{err}");
    }
}
