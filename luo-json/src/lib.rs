//! A minimal JSON writer: objects, arrays, strings, integers. Enough for `luo inspect --json`
//! and `luoctl status --json` without a serde dependency; one crate below both, so the two
//! commands escape strings the same way and luod need not depend on luo-cli.

#![forbid(unsafe_code)]

/// Builds one JSON document; commas are inserted automatically.
pub struct Json {
    out: String,
    /// Per open container: true once it has a member.
    stack: Vec<bool>,
    /// A key was just written: the next value follows it without a comma.
    after_key: bool,
}

impl Default for Json {
    fn default() -> Self {
        Self::new()
    }
}

impl Json {
    /// An empty document.
    pub fn new() -> Self {
        Json {
            out: String::new(),
            stack: Vec::new(),
            after_key: false,
        }
    }

    fn sep(&mut self) {
        if self.after_key {
            self.after_key = false;
            return;
        }
        if let Some(has) = self.stack.last_mut() {
            if *has {
                self.out.push(',');
            }
            *has = true;
        }
    }

    /// `"key":` inside an object.
    pub fn key(&mut self, k: &str) -> &mut Self {
        self.sep();
        self.out.push_str(&json_str(k));
        self.out.push(':');
        self.after_key = true;
        self
    }

    /// `{`.
    pub fn begin_object(&mut self) -> &mut Self {
        self.sep();
        self.out.push('{');
        self.stack.push(false);
        self
    }

    /// `}`.
    pub fn end_object(&mut self) -> &mut Self {
        self.stack.pop();
        self.out.push('}');
        self
    }

    /// `[`.
    pub fn begin_array(&mut self) -> &mut Self {
        self.sep();
        self.out.push('[');
        self.stack.push(false);
        self
    }

    /// `]`.
    pub fn end_array(&mut self) -> &mut Self {
        self.stack.pop();
        self.out.push(']');
        self
    }

    /// A string value.
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.sep();
        self.out.push_str(&json_str(s));
        self
    }

    /// An already-encoded value.
    pub fn raw(&mut self, v: &str) -> &mut Self {
        self.sep();
        self.out.push_str(v);
        self
    }

    /// An unsigned integer.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.sep();
        self.out.push_str(&v.to_string());
        self
    }

    /// A signed integer.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.sep();
        self.out.push_str(&v.to_string());
        self
    }

    /// `true` or `false`.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.sep();
        self.out.push_str(if v { "true" } else { "false" });
        self
    }

    /// `null`.
    pub fn null(&mut self) -> &mut Self {
        self.sep();
        self.out.push_str("null");
        self
    }

    /// The document.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A JSON string literal for `s`, escaped.
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                o.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A JSON string literal for arbitrary bytes: UTF-8 is kept, other bytes become U+FFFD.
pub fn json_bytes(b: &[u8]) -> String {
    json_str(&String::from_utf8_lossy(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document() {
        let mut j = Json::new();
        j.begin_object();
        j.key("a").u64(1);
        j.key("b").begin_array();
        j.string("x\"y\n");
        j.i64(-2);
        j.null();
        j.bool(true);
        j.end_array();
        j.key("c").begin_object().end_object();
        j.end_object();
        assert_eq!(j.finish(), r#"{"a":1,"b":["x\"y\n",-2,null,true],"c":{}}"#);
        assert_eq!(json_bytes(b"a\x01\xff"), "\"a\\u0001\u{fffd}\"");
    }
}
