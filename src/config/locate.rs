//! Maps a key path (`fabrics.public.paths.a.interface`) or a byte offset in
//! the TOML text to a line, column and dotted field name.
//!
//! serde gives us typed values but forgets where they came from; toml_edit
//! keeps spans. Validation errors carry a path, decode errors a span, and
//! this module turns either into the `file:line:column: field` that every
//! configuration error must name.

use std::ops::Range;

use toml_edit::{ImDocument, Item, TableLike, Value};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A dotted key path into the configuration document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    pub fn root() -> Self {
        Self(Vec::new())
    }

    pub fn key(&self, key: &str) -> Self {
        let mut segs = self.0.clone();
        segs.push(Seg::Key(key.to_string()));
        Self(segs)
    }

    pub fn index(&self, index: usize) -> Self {
        let mut segs = self.0.clone();
        segs.push(Seg::Index(index));
        Self(segs)
    }
}

impl std::fmt::Display for KeyPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for seg in &self.0 {
            match seg {
                Seg::Key(k) => {
                    if !first {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
            first = false;
        }
        Ok(())
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

/// The span of the value (or, failing that, the key) at `path`, or of the
/// deepest ancestor that exists (a missing field points at its table).
pub fn span_of(doc: &ImDocument<String>, path: &KeyPath) -> Option<Range<usize>> {
    let mut best = None;
    let mut item: &Item = doc.as_item();
    for seg in &path.0 {
        let next = match seg {
            Seg::Key(k) => {
                let table = item.as_table_like()?;
                match table.get_key_value(k) {
                    Some((key, value)) => {
                        best = value.span().or_else(|| key.span()).or(best);
                        Some(value)
                    }
                    None => None,
                }
            }
            Seg::Index(i) => match item {
                Item::ArrayOfTables(aot) => aot.get(*i).map(|t| {
                    best = t.span().or(best.clone());
                    None::<&Item>
                })?,
                Item::Value(Value::Array(arr)) => {
                    if let Some(v) = arr.get(*i) {
                        best = v.span().or(best);
                    }
                    return best;
                }
                _ => None,
            },
        };
        match next {
            Some(n) => item = n,
            None => break,
        }
    }
    best
}

/// The dotted path of the deepest key whose value contains `offset`.
pub fn path_at(doc: &ImDocument<String>, offset: usize) -> KeyPath {
    fn walk(table: &dyn TableLike, offset: usize, path: KeyPath) -> KeyPath {
        for (k, item) in table.iter() {
            let (key, _) = match table.get_key_value(k) {
                Some(kv) => kv,
                None => continue,
            };
            let span = item.span();
            let key_span = key.span();
            let inside = |r: &Option<Range<usize>>| {
                r.as_ref()
                    .is_some_and(|r| r.start <= offset && offset < r.end.max(r.start + 1))
            };
            let sub = path.key(k);
            if let Some(inner) = item.as_table_like() {
                let deeper = walk(inner, offset, sub.clone());
                if deeper.0.len() > sub.0.len() {
                    return deeper;
                }
                if inside(&span) || inside(&key_span) {
                    return sub;
                }
            } else if let Item::ArrayOfTables(aot) = item {
                for (i, t) in aot.iter().enumerate() {
                    let deeper = walk(t, offset, sub.index(i));
                    if deeper.0.len() > sub.0.len() + 1 {
                        return deeper;
                    }
                }
            } else if inside(&span) || inside(&key_span) {
                return sub;
            }
        }
        path
    }
    walk(doc.as_table(), offset, KeyPath::root())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "[a]\nx = 1\n[a.b]\ny = \"z\"\nlist = [1, 2]\n";

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }

    #[test]
    fn span_of_nested_key() {
        let doc = ImDocument::parse(DOC.to_string()).unwrap();
        let span = span_of(&doc, &KeyPath::root().key("a").key("b").key("y")).unwrap();
        assert_eq!(line_col(DOC, span.start).0, 4);
        let span = span_of(
            &doc,
            &KeyPath::root().key("a").key("b").key("list").index(1),
        )
        .unwrap();
        assert_eq!(&DOC[span], "2");
    }

    #[test]
    fn missing_key_points_at_parent() {
        let doc = ImDocument::parse(DOC.to_string()).unwrap();
        let span = span_of(&doc, &KeyPath::root().key("a").key("nope")).unwrap();
        assert_eq!(line_col(DOC, span.start).0, 1);
    }

    #[test]
    fn path_at_finds_deepest_key() {
        let doc = ImDocument::parse(DOC.to_string()).unwrap();
        let off = DOC.find("\"z\"").unwrap();
        assert_eq!(path_at(&doc, off).to_string(), "a.b.y");
    }
}
