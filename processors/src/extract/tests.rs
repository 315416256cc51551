use std::time::Instant;

use tailweave_core::config::parse;
use tailweave_core::proto::tonic::common::v1::any_value::Value as V;
use tailweave_core::StatusCode;

use super::*;
use crate::span_metrics::testspan::{attr_str, scope, span, sv};

const BK: &str = r#"
rules:
  - name: bk_api_result
    from: http.response.body
    when: {attribute: http.status_code, equals: 200}
    json: true
    into: {bk.result: /result, bk.code: /code, bk.message: /message}
    set_error:
      when: {attribute: bk.result, equals: false}
      message_from: bk.message
"#;

fn config(yaml: &str) -> ExtractConfig {
    parse(serde_yaml::from_str(yaml).expect("yaml")).expect("config")
}

fn build(yaml: &str) -> Extract {
    let c = config(yaml);
    assert!(c.validate().is_empty(), "{:?}", c.validate());
    c.build(&BuildContext::default()).expect("build")
}

fn run(p: &mut Extract, spans: Vec<Span>) -> Vec<Span> {
    let mut out = Vec::new();
    p.process(Instant::now(), SpanBatch::new(spans), &mut out);
    out.into_iter().flat_map(|b| b.spans).collect()
}

fn http(status: i64, body: &str) -> Span {
    let s = scope("bk-api", vec![]);
    span(&s, 1, 1, 0)
        .attr("http.status_code", V::IntValue(status))
        .attr("http.response.body", sv(body))
        .build()
}

#[test]
fn a_result_false_body_in_an_http_200_becomes_an_error_span() {
    let mut p = build(BK);
    let out = run(
        &mut p,
        vec![
            http(
                200,
                r#"{"result": false, "code": 1306201, "message": "app not found", "data": null}"#,
            ),
            http(
                200,
                r#"{"result": true, "code": 0, "message": "ok", "data": {"id": 1}}"#,
            ),
        ],
    );
    let bad = &out[0];
    assert_eq!(bad.status, StatusCode::Error);
    assert_eq!(
        bad.decode().unwrap().status.unwrap().message,
        "app not found"
    );
    assert_eq!(bad.attr("bk.result"), Some(AttrValue::Bool(false)));
    assert_eq!(bad.attr("bk.code"), Some(AttrValue::Int(1306201)));
    let good = &out[1];
    assert_eq!(good.status, StatusCode::Unset);
    assert_eq!(good.attr("bk.result"), Some(AttrValue::Bool(true)));
    assert_eq!(attr_str(good, "bk.message").as_deref(), Some("ok"));
    assert_eq!(p.stats().extracted, 2);
    assert_eq!(p.stats().errors_set, 1);
    assert_eq!(p.stats().failed, 0);
}

#[test]
fn a_false_precondition_or_a_missing_source_is_not_a_failure() {
    let mut p = build(BK);
    let not_200 = http(500, r#"{"result": false}"#);
    let no_body = span(&scope("x", vec![]), 2, 1, 0).build();
    let raws = (not_200.raw.clone(), no_body.raw.clone());
    let out = run(&mut p, vec![not_200, no_body]);
    assert_eq!((out[0].raw.clone(), out[1].raw.clone()), raws);
    assert_eq!(p.stats(), &ExtractStats::default());
}

#[test]
fn a_rule_that_fails_leaves_the_span_unchanged_and_is_counted() {
    let mut p = build(BK);
    // eBPF agents capture a bounded prefix of the body: truncated JSON.
    let truncated = http(200, r#"{"result": false, "code": 13062"#);
    let no_target = http(200, r#"{"other": 1}"#);
    let raws = (truncated.raw.clone(), no_target.raw.clone());
    let out = run(&mut p, vec![truncated, no_target]);
    assert_eq!((out[0].raw.clone(), out[1].raw.clone()), raws);
    assert_eq!(out[0].status, StatusCode::Unset);
    assert_eq!(p.stats().failed, 2);
    assert_eq!(p.stats().extracted, 0);
}

#[test]
fn regex_and_key_value_rules_and_chaining() {
    let mut p = build(
        r#"
rules:
  - from: url.full
    regex: 'code=(?P<code>\d+)&uid=(\w+)'
  - from: url.full
    regex: 'uid=(\w+)'
    into: {app.uid: "1"}
  - from: cookie
    key_value: {separator: "=", pair_separator: ";"}
    into: {user.id: uid}
  - from: header
    key_value: {}
  - name: from_extracted
    from: code
    regex: '^(?P<first>\d)'
    set_error:
      when: {attribute: first, matches: '^[45]$'}
"#,
    );
    let s = scope("web", vec![]);
    let sp = span(&s, 1, 1, 0)
        .attr("url.full", sv("http://x/a?code=503&uid=bob"))
        .attr("cookie", sv("theme=dark; uid=u-7 ; x"))
        .attr("header", sv("a=1&b=2"))
        .build();
    let out = run(&mut p, vec![sp]);
    let o = &out[0];
    assert_eq!(attr_str(o, "code").as_deref(), Some("503"));
    assert_eq!(attr_str(o, "app.uid").as_deref(), Some("bob"));
    assert_eq!(attr_str(o, "user.id").as_deref(), Some("u-7"));
    assert_eq!(attr_str(o, "a").as_deref(), Some("1"));
    assert_eq!(attr_str(o, "b").as_deref(), Some("2"));
    assert_eq!(attr_str(o, "first").as_deref(), Some("5"));
    assert_eq!(o.status, StatusCode::Error);
    assert_eq!(
        o.decode().unwrap().status.unwrap().message,
        "extract rule from_extracted marked this span as an error"
    );

    let miss = span(&s, 2, 1, 0).attr("url.full", sv("http://x/")).build();
    let mut p2 = build("rules: [{from: url.full, regex: 'code=(?P<code>\\d+)'}]");
    let out = run(&mut p2, vec![miss.clone()]);
    assert_eq!(out[0].raw, miss.raw);
    assert_eq!(p2.stats().failed, 1);
}

#[test]
fn conditions_compare_by_type() {
    let c = |yaml: &str| {
        let cond: Condition = serde_yaml::from_str(yaml).unwrap();
        let mut issues = Vec::new();
        let c = compile_cond("when", &cond, &mut issues).expect("compiles");
        assert!(issues.is_empty());
        c
    };
    let f = c("{attribute: a, equals: false}");
    assert!(f.holds(Some(Scalar::Bool(false))));
    assert!(f.holds(Some(Scalar::Str("false".into()))));
    assert!(!f.holds(Some(Scalar::Str("0".into()))));
    assert!(!f.holds(None));
    let n = c("{attribute: a, equals: 200}");
    assert!(n.holds(Some(Scalar::Num(200.0))));
    assert!(n.holds(Some(Scalar::Str("200".into()))));
    let s = c("{attribute: a, equals: '200'}");
    assert!(s.holds(Some(Scalar::Num(200.0))));
    let ne = c("{attribute: a, not_equals: ok}");
    assert!(ne.holds(None));
    assert!(!ne.holds(Some(Scalar::Str("ok".into()))));
    let ex = c("{attribute: a, exists: false}");
    assert!(ex.holds(None));
}

#[test]
fn validation_names_every_bad_rule_by_its_path() {
    let c = config(
        r#"
rules:
  - from: body
    regex: '(?P<code>\d+'
  - from: body
    json: true
    into: {x: result}
  - from: body
    json: true
    regex: 'a'
  - from: body
    regex: '(?P<code>\d+)'
    into: {x: nope, y: "2"}
  - from: body
    key_value: {separator: "", pair_separator: ";"}
  - from: ""
    json: true
    into: {x: /a}
    when: {attribute: a, equals: 1, exists: true}
    set_error:
      when: {attribute: x, matches: '('}
  - from: body
    json: true
"#,
    );
    let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
    assert_eq!(
        paths,
        vec![
            "rules[0].regex",
            "rules[1].into.x",
            "rules[2]",
            "rules[3].into.x",
            "rules[3].into.y",
            "rules[4].key_value.separator",
            "rules[5].from",
            "rules[5].when",
            "rules[5].set_error.when.matches",
            "rules[6].into",
        ]
    );
    assert!(c.build(&BuildContext::default()).is_err());
    assert_eq!(ExtractConfig::default().validate()[0].path, "rules");
    assert!(config(BK).validate().is_empty());
}
