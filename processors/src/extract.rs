//! The `extract` processor: lifts fields out of a span attribute (a body or header the eBPF agent
//! captured, a URL, any attribute) into new attributes, and may mark the span as an error, so
//! errors a protocol hides (an HTTP 200 whose body says it failed) become visible, by rule in YAML
//! instead of by a hand-written plugin.
//!
//! # Rules
//! ```yaml
//! extract:
//!   rules:
//!     # The BlueKing API convention: HTTP 200 with {"result": false, "code": ..., "message": ...}
//!     # is an error.
//!     - name: bk_api_result
//!       from: http.response.body          # the attribute to read (span, else resource)
//!       when: {attribute: http.status_code, equals: 200}   # optional precondition
//!       json: true                        # parse JSON; `into` values are JSON pointers
//!       into: {bk.result: /result, bk.code: /code, bk.message: /message}
//!       set_error:
//!         when: {attribute: bk.result, equals: false}
//!         message_from: bk.message        # else `message`, else a text naming the rule
//!     - from: url.full
//!       regex: 'code=(?P<code>\d+)'       # `into` values are group names or numbers;
//!       into: {app.code: code}            # without `into`, every named group under its name
//!     - from: http.request.header.cookie
//!       key_value: {separator: "=", pair_separator: ";"}   # `into` values are keys;
//!       into: {user.id: uid}              # without `into`, every pair under its key
//! ```
//! Each rule uses exactly one of `json`, `regex` and `key_value`. A condition (`when`,
//! `set_error.when`) names an `attribute` and one test: `equals` or `not_equals` (a string, number
//! or boolean, compared by type: `false` matches the boolean and the string `"false"`), `exists`
//! (`true`/`false`) or `matches` (a regex). `set_error.when` sees the attributes the rule just
//! extracted as well as the span's own. Everything is checked at load: a bad regex, pointer,
//! group or separator is a config error with its key path.
//!
//! # Failures
//! A span without the `from` attribute, or whose `when` is false, is not a failure: the rule just
//! does not apply. A rule *fails* when its source does not parse as JSON, the regex does not match,
//! no pair is found, or none of its `into` targets yields a value; the rule then leaves the span
//! unchanged, and the failure is counted by rule and reason. Other rules still apply.
//!
//! Place it before `tail_sampling`: an error found here is an error span, so a `status_code`
//! policy keeps the trace.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Instant;

use regex::Regex;
use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use tailweave_core::proto::tonic::trace::v1::{status, Status};
use tailweave_core::{AttrValue, ComponentError, Processor, Span, SpanBatch};

/// Rule applications that extracted something, by `rule`.
pub const EXTRACTED: &str = "tailweave_extract_extracted_spans_total";
/// Rule applications that failed (span left unchanged by that rule), by `rule` and `reason`.
pub const FAILED: &str = "tailweave_extract_failed_spans_total";
/// Spans a rule marked as errors, by `rule`.
pub const ERRORS_SET: &str = "tailweave_extract_error_spans_total";

/// `key_value`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyValueFormat {
    /// Between a key and its value. Default `=`.
    pub separator: String,
    /// Between pairs. Default `&`.
    pub pair_separator: String,
}

impl Default for KeyValueFormat {
    fn default() -> Self {
        KeyValueFormat {
            separator: "=".into(),
            pair_separator: "&".into(),
        }
    }
}

/// A test on one attribute.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The attribute key. Required.
    pub attribute: String,
    /// The attribute has this value (string, number or boolean).
    #[serde(default)]
    pub equals: Option<serde_yaml::Value>,
    /// The attribute is absent or has another value.
    #[serde(default)]
    pub not_equals: Option<serde_yaml::Value>,
    /// The attribute is present (`true`) or absent (`false`).
    #[serde(default)]
    pub exists: Option<bool>,
    /// The attribute's text matches this regex.
    #[serde(default)]
    pub matches: Option<String>,
}

/// `set_error`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetError {
    /// When the span is an error; sees the attributes this rule extracted. Required.
    pub when: Condition,
    /// Attribute whose text becomes the status message. Default none.
    #[serde(default)]
    pub message_from: Option<String>,
    /// Status message when `message_from` is unset or absent. Default names the rule.
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Names the rule in counters and status messages. Default `rules[<index>]`.
    #[serde(default)]
    pub name: Option<String>,
    /// The attribute to read (span attribute, else resource attribute). Required.
    pub from: String,
    /// Apply the rule only when this holds. Default always.
    #[serde(default)]
    pub when: Option<Condition>,
    /// Parse `from` as JSON; `into` values are JSON pointers (`/result`, `/data/0/id`).
    #[serde(default)]
    pub json: bool,
    /// Match `from` with this regex; `into` values are group names or numbers.
    #[serde(default)]
    pub regex: Option<String>,
    /// Split `from` into pairs; `into` values are keys.
    #[serde(default)]
    pub key_value: Option<KeyValueFormat>,
    /// New attribute -> pointer, group or key. Required for `json`; default for `regex` every
    /// named group, for `key_value` every pair.
    #[serde(default)]
    pub into: BTreeMap<String, String>,
    /// Mark the span as an error when a condition holds after extraction. Default never.
    #[serde(default)]
    pub set_error: Option<SetError>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExtractConfig {
    /// Applied in order; a later rule sees the attributes earlier ones wrote. Required.
    pub rules: Vec<Rule>,
}

/// A value a condition compares with.
#[derive(Debug, Clone, PartialEq)]
enum Want {
    Str(String),
    Num(f64),
    Bool(bool),
}

#[derive(Debug, Clone)]
enum Test {
    Equals(Want),
    NotEquals(Want),
    Exists(bool),
    Matches(Regex),
}

#[derive(Debug, Clone)]
struct Cond {
    attribute: String,
    test: Test,
}

#[derive(Debug, Clone)]
enum Method {
    Json,
    Regex(Regex),
    KeyValue(KeyValueFormat),
}

#[derive(Debug, Clone)]
struct Compiled {
    name: String,
    from: String,
    when: Option<Cond>,
    method: Method,
    into: Vec<(String, String)>,
    set_error: Option<(Cond, Option<String>, Option<String>)>,
}

fn want(path: &str, v: &serde_yaml::Value) -> Result<Want, ConfigIssue> {
    use serde_yaml::Value as Y;
    match v {
        Y::String(s) => Ok(Want::Str(s.clone())),
        Y::Bool(b) => Ok(Want::Bool(*b)),
        Y::Number(n) => n
            .as_f64()
            .map(Want::Num)
            .ok_or_else(|| ConfigIssue::new(path, "not a number")),
        _ => Err(ConfigIssue::new(
            path,
            "must be a string, number or boolean",
        )),
    }
}

fn compile_cond(path: &str, c: &Condition, out: &mut Vec<ConfigIssue>) -> Option<Cond> {
    if c.attribute.trim().is_empty() {
        out.push(ConfigIssue::new(format!("{path}.attribute"), "required"));
    }
    let n = [
        c.equals.is_some(),
        c.not_equals.is_some(),
        c.exists.is_some(),
        c.matches.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if n != 1 {
        out.push(ConfigIssue::new(
            path,
            "exactly one of equals, not_equals, exists, matches is required",
        ));
        return None;
    }
    let test = if let Some(v) = &c.equals {
        Test::Equals(
            want(&format!("{path}.equals"), v)
                .map_err(|e| out.push(e))
                .ok()?,
        )
    } else if let Some(v) = &c.not_equals {
        Test::NotEquals(
            want(&format!("{path}.not_equals"), v)
                .map_err(|e| out.push(e))
                .ok()?,
        )
    } else if let Some(e) = c.exists {
        Test::Exists(e)
    } else {
        let re = c.matches.as_deref().unwrap_or_default();
        match Regex::new(re) {
            Ok(r) => Test::Matches(r),
            Err(e) => {
                out.push(ConfigIssue::new(format!("{path}.matches"), e.to_string()));
                return None;
            }
        }
    };
    Some(Cond {
        attribute: c.attribute.clone(),
        test,
    })
}

impl ExtractConfig {
    fn compile(&self) -> Result<Vec<Compiled>, Vec<ConfigIssue>> {
        let mut out = Vec::new();
        let mut rules = Vec::new();
        if self.rules.is_empty() {
            out.push(ConfigIssue::new("rules", "at least one rule is required"));
        }
        let mut names: Vec<String> = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            let p = format!("rules[{i}]");
            let name = r.name.clone().unwrap_or_else(|| p.clone());
            if names.contains(&name) {
                out.push(ConfigIssue::new(
                    format!("{p}.name"),
                    format!("{name:?} is used twice"),
                ));
            }
            names.push(name.clone());
            if r.from.trim().is_empty() {
                out.push(ConfigIssue::new(
                    format!("{p}.from"),
                    "required: the attribute to read",
                ));
            }
            let when = r
                .when
                .as_ref()
                .and_then(|c| compile_cond(&format!("{p}.when"), c, &mut out));
            let methods = [r.json, r.regex.is_some(), r.key_value.is_some()]
                .iter()
                .filter(|x| **x)
                .count();
            if methods != 1 {
                out.push(ConfigIssue::new(
                    &p,
                    "exactly one of json, regex, key_value is required",
                ));
                continue;
            }
            for k in r.into.keys() {
                if k.trim().is_empty() {
                    out.push(ConfigIssue::new(
                        format!("{p}.into"),
                        "an attribute name is empty",
                    ));
                }
            }
            let method = if r.json {
                if r.into.is_empty() {
                    out.push(ConfigIssue::new(
                        format!("{p}.into"),
                        "required with json: new attribute -> JSON pointer",
                    ));
                }
                for (k, ptr) in &r.into {
                    if !ptr.is_empty() && !ptr.starts_with('/') {
                        out.push(ConfigIssue::new(
                            format!("{p}.into.{k}"),
                            format!("{ptr:?} is not a JSON pointer (it starts with /, or is empty for the whole document)"),
                        ));
                    }
                }
                Some(Method::Json)
            } else if let Some(re) = &r.regex {
                match Regex::new(re) {
                    Ok(rx) => {
                        let named: Vec<&str> = rx.capture_names().flatten().collect();
                        if r.into.is_empty() && named.is_empty() {
                            out.push(ConfigIssue::new(
                                format!("{p}.into"),
                                "the regex has no named group: name groups (?P<name>...) or list them in into",
                            ));
                        }
                        for (k, g) in &r.into {
                            let ok = match g.parse::<usize>() {
                                Ok(n) => n < rx.captures_len(),
                                Err(_) => named.contains(&g.as_str()),
                            };
                            if !ok {
                                out.push(ConfigIssue::new(
                                    format!("{p}.into.{k}"),
                                    format!("the regex has no group {g:?}"),
                                ));
                            }
                        }
                        Some(Method::Regex(rx))
                    }
                    Err(e) => {
                        out.push(ConfigIssue::new(format!("{p}.regex"), e.to_string()));
                        None
                    }
                }
            } else {
                let kv = r.key_value.clone().unwrap_or_default();
                if kv.separator.is_empty() {
                    out.push(ConfigIssue::new(
                        format!("{p}.key_value.separator"),
                        "must not be empty",
                    ));
                }
                if kv.pair_separator.is_empty() {
                    out.push(ConfigIssue::new(
                        format!("{p}.key_value.pair_separator"),
                        "must not be empty",
                    ));
                }
                if !kv.separator.is_empty() && kv.separator == kv.pair_separator {
                    out.push(ConfigIssue::new(
                        format!("{p}.key_value"),
                        "separator and pair_separator must differ",
                    ));
                }
                Some(Method::KeyValue(kv))
            };
            let set_error = r.set_error.as_ref().and_then(|s| {
                compile_cond(&format!("{p}.set_error.when"), &s.when, &mut out)
                    .map(|c| (c, s.message_from.clone(), s.message.clone()))
            });
            if let Some(method) = method {
                rules.push(Compiled {
                    name,
                    from: r.from.clone(),
                    when,
                    method,
                    into: r.into.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    set_error,
                });
            }
        }
        if out.is_empty() {
            Ok(rules)
        } else {
            Err(out)
        }
    }

    pub fn validate(&self) -> Vec<ConfigIssue> {
        self.compile().err().unwrap_or_default()
    }

    pub fn build(&self, ctx: &BuildContext) -> Result<Extract, ComponentError> {
        let rules = self.compile().map_err(|issues| {
            let all: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
            ComponentError::build(&ctx.id, all.join("; "))
        })?;
        Ok(Extract {
            id: ctx.id.clone(),
            rules,
            stats: ExtractStats::default(),
        })
    }
}

/// Counts of one processor, beside the metrics (for tests and `describe`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExtractStats {
    pub extracted: u64,
    pub failed: u64,
    pub errors_set: u64,
}

pub struct Extract {
    id: String,
    rules: Vec<Compiled>,
    stats: ExtractStats,
}

/// A value as conditions see it.
#[derive(Debug, Clone, PartialEq)]
enum Scalar<'a> {
    Str(Cow<'a, str>),
    Num(f64),
    Bool(bool),
}

impl Scalar<'_> {
    fn text(&self) -> Cow<'_, str> {
        match self {
            Scalar::Str(s) => Cow::Borrowed(s),
            Scalar::Num(n) => Cow::Owned(n.to_string()),
            Scalar::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        }
    }
    fn equals(&self, w: &Want) -> bool {
        match w {
            Want::Bool(b) => match self {
                Scalar::Bool(x) => x == b,
                Scalar::Str(s) => s.trim().parse::<bool>().ok() == Some(*b),
                Scalar::Num(_) => false,
            },
            Want::Num(n) => match self {
                Scalar::Num(x) => x == n,
                Scalar::Str(s) => s.trim().parse::<f64>().ok() == Some(*n),
                Scalar::Bool(_) => false,
            },
            Want::Str(s) => self.text() == s.as_str(),
        }
    }
}

fn scalar_of_attr(v: AttrValue<'_>) -> Scalar<'_> {
    match v {
        AttrValue::Str(s) => Scalar::Str(Cow::Borrowed(s)),
        AttrValue::Bool(b) => Scalar::Bool(b),
        AttrValue::Int(i) => Scalar::Num(i as f64),
        AttrValue::Double(d) => Scalar::Num(d),
        other => Scalar::Str(Cow::Owned(other.to_string_lossy())),
    }
}

fn scalar_of_any(v: &AnyValue) -> Option<Scalar<'_>> {
    use any_value::Value as V;
    Some(match v.value.as_ref()? {
        V::StringValue(s) => Scalar::Str(Cow::Borrowed(s)),
        V::BoolValue(b) => Scalar::Bool(*b),
        V::IntValue(i) => Scalar::Num(*i as f64),
        V::DoubleValue(d) => Scalar::Num(*d),
        _ => return None,
    })
}

impl Cond {
    fn holds(&self, v: Option<Scalar<'_>>) -> bool {
        match (&self.test, v) {
            (Test::Exists(e), v) => v.is_some() == *e,
            (Test::Equals(w), Some(v)) => v.equals(w),
            (Test::Equals(_), None) => false,
            (Test::NotEquals(w), Some(v)) => !v.equals(w),
            (Test::NotEquals(_), None) => true,
            (Test::Matches(r), Some(v)) => r.is_match(&v.text()),
            (Test::Matches(_), None) => false,
        }
    }
}

/// Why a rule failed on a span (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    NotJson,
    NoMatch,
    NothingFound,
}

impl Failure {
    fn as_str(&self) -> &'static str {
        match self {
            Failure::NotJson => "not_json",
            Failure::NoMatch => "no_match",
            Failure::NothingFound => "nothing_found",
        }
    }
}

fn str_any(s: impl Into<String>) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.into())),
    }
}

fn json_any(v: &serde_json::Value) -> Option<AnyValue> {
    use any_value::Value as V;
    use serde_json::Value as J;
    let value = match v {
        J::Null => return None,
        J::Bool(b) => V::BoolValue(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => V::IntValue(i),
            None => V::DoubleValue(n.as_f64()?),
        },
        J::String(s) => V::StringValue(s.clone()),
        // Nested values stay JSON text: attributes are flat for the backends that search them.
        other => V::StringValue(other.to_string()),
    };
    Some(AnyValue { value: Some(value) })
}

impl Compiled {
    fn extract(&self, src: AttrValue<'_>) -> Result<Vec<(String, AnyValue)>, Failure> {
        let text: Cow<'_, str> = match src {
            AttrValue::Str(s) => Cow::Borrowed(s),
            AttrValue::Bytes(b) => String::from_utf8_lossy(b),
            other => Cow::Owned(other.to_string_lossy()),
        };
        let mut got = Vec::new();
        match &self.method {
            Method::Json => {
                let doc: serde_json::Value =
                    serde_json::from_str(&text).map_err(|_| Failure::NotJson)?;
                for (k, ptr) in &self.into {
                    if let Some(v) = doc.pointer(ptr).and_then(json_any) {
                        got.push((k.clone(), v));
                    }
                }
            }
            Method::Regex(rx) => {
                let caps = rx.captures(&text).ok_or(Failure::NoMatch)?;
                if self.into.is_empty() {
                    for name in rx.capture_names().flatten() {
                        if let Some(m) = caps.name(name) {
                            got.push((name.to_string(), str_any(m.as_str())));
                        }
                    }
                } else {
                    for (k, g) in &self.into {
                        let m = match g.parse::<usize>() {
                            Ok(n) => caps.get(n),
                            Err(_) => caps.name(g),
                        };
                        if let Some(m) = m {
                            got.push((k.clone(), str_any(m.as_str())));
                        }
                    }
                }
            }
            Method::KeyValue(f) => {
                let pairs: Vec<(&str, &str)> = text
                    .split(f.pair_separator.as_str())
                    .filter_map(|p| p.split_once(f.separator.as_str()))
                    .map(|(k, v)| (k.trim(), v.trim()))
                    .filter(|(k, _)| !k.is_empty())
                    .collect();
                if pairs.is_empty() {
                    return Err(Failure::NoMatch);
                }
                if self.into.is_empty() {
                    got.extend(pairs.iter().map(|(k, v)| (k.to_string(), str_any(*v))));
                } else {
                    for (k, key) in &self.into {
                        if let Some((_, v)) = pairs.iter().find(|(pk, _)| pk == key) {
                            got.push((k.clone(), str_any(*v)));
                        }
                    }
                }
            }
        }
        if got.is_empty() {
            return Err(Failure::NothingFound);
        }
        Ok(got)
    }
}

/// A key's value: what this span's rules wrote so far, else the span's own attribute.
fn lookup<'a>(written: &'a [(String, AnyValue)], span: &'a Span, key: &str) -> Option<Scalar<'a>> {
    match written.iter().rev().find(|(k, _)| k == key) {
        Some((_, v)) => scalar_of_any(v),
        None => span.attr_or_resource(key).map(scalar_of_attr),
    }
}

impl Extract {
    pub fn stats(&self) -> &ExtractStats {
        &self.stats
    }

    fn apply(&mut self, span: &mut Span) {
        let mut written: Vec<(String, AnyValue)> = Vec::new();
        let mut error: Option<String> = None;
        for r in &self.rules {
            if let Some(c) = &r.when {
                if !c.holds(lookup(&written, span, &c.attribute)) {
                    continue;
                }
            }
            let src = match written.iter().rev().find(|(k, _)| *k == r.from) {
                Some((_, v)) => match &v.value {
                    Some(any_value::Value::StringValue(s)) => Some(AttrValue::Str(s)),
                    _ => None,
                },
                None => span.attr_or_resource(&r.from),
            };
            let Some(src) = src else { continue };
            let result = r.extract(src);
            match result {
                Ok(vals) => {
                    self.stats.extracted += 1;
                    metrics::counter!(EXTRACTED, "processor" => self.id.clone(), "rule" => r.name.clone())
                        .increment(1);
                    written.extend(vals);
                    if let Some((c, from, msg)) = &r.set_error {
                        if c.holds(lookup(&written, span, &c.attribute)) {
                            let text = from
                                .as_ref()
                                .and_then(|k| {
                                    lookup(&written, span, k).map(|v| v.text().into_owned())
                                })
                                .or_else(|| msg.clone())
                                .unwrap_or_else(|| {
                                    format!("extract rule {} marked this span as an error", r.name)
                                });
                            error = Some(text);
                            self.stats.errors_set += 1;
                            metrics::counter!(ERRORS_SET, "processor" => self.id.clone(), "rule" => r.name.clone())
                                .increment(1);
                        }
                    }
                }
                Err(f) => {
                    self.stats.failed += 1;
                    metrics::counter!(FAILED, "processor" => self.id.clone(), "rule" => r.name.clone(), "reason" => f.as_str())
                        .increment(1);
                }
            }
        }
        if written.is_empty() && error.is_none() {
            return;
        }
        let r = span.edit(|p| {
            for (k, v) in written {
                match p.attributes.iter_mut().find(|kv| kv.key == k) {
                    Some(kv) => kv.value = Some(v),
                    None => p.attributes.push(KeyValue {
                        key: k,
                        value: Some(v),
                        ..Default::default()
                    }),
                }
            }
            if let Some(message) = error {
                p.status = Some(Status {
                    message,
                    code: status::StatusCode::Error as i32,
                });
            }
        });
        if r.is_err() {
            self.stats.failed += 1;
            metrics::counter!(FAILED, "processor" => self.id.clone(), "rule" => "*", "reason" => "undecodable_span")
                .increment(1);
        }
    }
}

impl Processor for Extract {
    fn process(&mut self, _now: Instant, mut batch: SpanBatch, out: &mut Vec<SpanBatch>) {
        for span in batch.spans.iter_mut() {
            self.apply(span);
        }
        out.push(batch);
    }
}

#[cfg(test)]
mod tests;
