//! Maps key paths (`receivers.otlp.protocols.grpc.endpoint`, `service.pipelines.traces.exporters[1]`)
//! to the line they are written on, so every config problem can name its line.
//!
//! serde_yaml's `Value` keeps no positions, so we walk the parser's marked events once.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

#[derive(Debug, Default)]
pub struct LineIndex {
    lines: HashMap<String, usize>,
}

enum Frame {
    Map { key: Option<String> },
    Seq { index: usize },
}

struct Builder {
    stack: Vec<Frame>,
    path: Vec<String>,
    lines: HashMap<String, usize>,
}

impl Builder {
    fn current(&self) -> String {
        let mut s = String::new();
        for seg in self.path.iter().filter(|s| !s.is_empty()) {
            if !seg.starts_with('[') && !s.is_empty() {
                s.push('.');
            }
            s.push_str(seg);
        }
        s
    }

    /// A value (scalar or container start) begins at `line`: push exactly one path segment.
    fn enter_value(&mut self, line: usize) {
        let seg = match self.stack.last_mut() {
            Some(Frame::Map { key }) => key.take().unwrap_or_default(),
            Some(Frame::Seq { index }) => {
                *index += 1;
                format!("[{}]", *index - 1)
            }
            None => String::new(),
        };
        self.path.push(seg);
        let p = self.current();
        if !p.is_empty() {
            self.lines.entry(p).or_insert(line);
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(v, ..) => {
                if let Some(Frame::Map { key }) = self.stack.last_mut() {
                    if key.is_none() {
                        *key = Some(v.clone());
                        let mut p = self.current();
                        if !p.is_empty() {
                            p.push('.');
                        }
                        p.push_str(&v);
                        self.lines.entry(p).or_insert(line);
                        return;
                    }
                }
                self.enter_value(line);
                self.path.pop();
            }
            Event::Alias(_) => {
                self.enter_value(line);
                self.path.pop();
            }
            Event::MappingStart(..) => {
                self.enter_value(line);
                self.stack.push(Frame::Map { key: None });
            }
            Event::SequenceStart(..) => {
                self.enter_value(line);
                self.stack.push(Frame::Seq { index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.path.pop();
            }
            _ => {}
        }
    }
}

impl LineIndex {
    /// Builds the index; on a YAML syntax error the index is simply partial.
    pub fn build(text: &str) -> LineIndex {
        let mut b = Builder {
            stack: Vec::new(),
            path: Vec::new(),
            lines: HashMap::new(),
        };
        let mut p = Parser::new_from_str(text);
        let _ = p.load(&mut b, false);
        LineIndex { lines: b.lines }
    }

    /// The line of `path`, or of its nearest recorded ancestor.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(l) = self.lines.get(p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_list_items() {
        let y = "receivers:\n  otlp:\n    protocols:\n      grpc:\n        endpoint: x\nservice:\n  pipelines:\n    traces:\n      exporters: [a, b]\n      receivers:\n        - otlp\n        - other\n";
        let ix = LineIndex::build(y);
        assert_eq!(ix.line_of("receivers"), Some(1));
        assert_eq!(
            ix.line_of("receivers.otlp.protocols.grpc.endpoint"),
            Some(5)
        );
        assert_eq!(ix.line_of("service.pipelines.traces.exporters[1]"), Some(9));
        assert_eq!(
            ix.line_of("service.pipelines.traces.receivers[1]"),
            Some(12)
        );
        assert_eq!(
            ix.line_of("receivers.otlp.protocols.grpc.nope.deeper"),
            Some(4)
        );
    }
}
