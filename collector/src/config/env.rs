//! `${env:NAME}`, `${env:NAME:-default}` and `${NAME}` substitution on the config text, `$$` escapes.
//!
//! Substitution runs on the text before YAML parsing, as the Collector's env provider does, so a
//! value may hold any YAML scalar. An unset variable with no default becomes empty and is reported
//! as a warning (the Collector's behaviour), never silently.

/// The substituted text and the names of unset variables that had no default.
pub fn substitute(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(String, Vec<String>), String> {
    let mut out = String::with_capacity(text.len());
    let mut unset = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    let mut line = 1;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
        }
        if c != b'$' {
            // Copy one UTF-8 char.
            let ch_len = utf8_len(c);
            out.push_str(&text[i..i + ch_len]);
            i += ch_len;
            continue;
        }
        match b.get(i + 1) {
            Some(b'$') => {
                out.push('$');
                i += 2;
            }
            Some(b'{') => {
                let Some(end) = text[i + 2..].find('}') else {
                    return Err(format!("line {line}: unterminated `${{` in config"));
                };
                let inner = &text[i + 2..i + 2 + end];
                let expr = inner.strip_prefix("env:").unwrap_or(inner);
                let (name, default) = match expr.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (expr, None),
                };
                if name.is_empty() || !name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
                {
                    return Err(format!(
                        "line {line}: `${{{inner}}}` is not a valid reference (use ${{env:NAME}} or ${{env:NAME:-default}})"
                    ));
                }
                match lookup(name) {
                    Some(v) => out.push_str(&v),
                    None => match default {
                        Some(d) => out.push_str(d),
                        None => unset.push(name.to_string()),
                    },
                }
                i += 2 + end + 1;
            }
            _ => {
                out.push('$');
                i += 1;
            }
        }
    }
    Ok((out, unset))
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(n: &str) -> Option<String> {
        match n {
            "HOST" => Some("10.0.0.1".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn forms() {
        let (s, unset) = substitute(
            "a: ${env:HOST}:4317\nb: ${HOST}\nc: ${env:NOPE:-dflt}\nd: $$x ${env:NOPE}é",
            env,
        )
        .unwrap();
        assert_eq!(s, "a: 10.0.0.1:4317\nb: 10.0.0.1\nc: dflt\nd: $x é");
        assert_eq!(unset, vec!["NOPE".to_string()]);
    }

    #[test]
    fn errors_name_the_line() {
        let e = substitute("a: 1\nb: ${env:X", env).unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = substitute("a: ${env:bad name}", env).unwrap_err();
        assert!(e.contains("not a valid reference"), "{e}");
    }
}
