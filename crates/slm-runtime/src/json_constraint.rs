//! Constrained decoding to JSON: a character-level recogniser of JSON documents, optionally
//! of one JSON Schema, that says whether a piece of text can still continue into a valid
//! document. Generation masks every token whose text would leave the language, and allows
//! the end-of-sequence token only once the document is complete, so the output parses and
//! validates whenever generation ends by itself.
//!
//! The recogniser keeps a set of parse stacks (a schema's `anyOf`, `enum` or optional
//! properties may continue in several ways at once); a stack is a list of frames, the top one
//! consuming the next character. Object properties of a schema are written in the schema's
//! order, optional ones skippable, as llama.cpp's json-schema-to-grammar does.
//!
//! The schema subset: `type` (one or a list), `properties`, `required`,
//! `additionalProperties`, `items`, `minItems`, `maxItems`, `enum`, `const`, `anyOf`,
//! `oneOf` (as anyOf), `$ref` into `#/$defs` or `#/definitions`; annotations (`title`,
//! `description`, ...) are ignored. Other constraints (`pattern`, `minLength`, `minimum`,
//! `format`, ...) are refused, since the output could not be guaranteed to meet them.

use serde_json::Value;

/// A compiled schema: nodes in an arena (so `$ref` may recurse), the root first.
#[derive(Debug, Clone)]
pub struct JsonGrammar {
    nodes: Vec<Node>,
    root: usize,
}

/// Nodes every grammar has, at fixed places: any value, any object, any array, and the
/// literals of the null and boolean types.
const ANY: usize = 0;
const ANY_OBJECT: usize = 1;
const ANY_ARRAY: usize = 2;
const ANY_LITERAL: usize = 3;
const NULL: usize = 4;
const BOOL: usize = 5;

fn builtin() -> Vec<Node> {
    let lits = |l: &[&str]| Node::Literals(l.iter().map(|s| s.to_string()).collect());
    vec![
        Node::Any,
        Node::Object {
            props: Vec::new(),
            additional: Some(ANY),
        },
        Node::Array {
            items: ANY,
            min: 0,
            max: usize::MAX,
        },
        lits(&["true", "false", "null"]),
        lits(&["null"]),
        lits(&["true", "false"]),
    ]
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Any,
    Integer,
    Number,
    String,
    /// Compact JSON texts of the allowed values (enum, const).
    Literals(Vec<String>),
    Array {
        items: usize,
        min: usize,
        max: usize,
    },
    Object {
        /// (name as it appears between the quotes, value node, required), in order.
        props: Vec<(String, usize, bool)>,
        /// Other keys with this value node (None: no other keys). Only without `props`.
        additional: Option<usize>,
    },
    AnyOf(Vec<usize>),
    /// A `$ref`, resolved after compiling.
    Ref(String),
}

/// Schema nesting and size bounds: a schema is untrusted input.
const MAX_NODES: usize = 4096;
const MAX_DEPTH: usize = 64;
/// Parse stacks kept at once; alternatives beyond this are dropped (the first ones kept).
const MAX_STACKS: usize = 64;
/// Whitespace characters in a row; without a bound a model may pad forever.
const MAX_WS: u8 = 16;

const IGNORED: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "$defs",
    "definitions",
    "strict",
    "readOnly",
    "writeOnly",
    "deprecated",
];

impl JsonGrammar {
    /// Any JSON object (OpenAI's `json_object` mode).
    pub fn object() -> Self {
        JsonGrammar {
            nodes: builtin(),
            root: ANY_OBJECT,
        }
    }

    /// The documents valid under `schema`, or what in it is not supported.
    pub fn from_schema(schema: &Value) -> Result<Self, String> {
        let mut g = JsonGrammar {
            nodes: builtin(),
            root: 0,
        };
        g.root = g.compile(schema, "#", 0)?;
        // $refs: compile each referenced definition once, then point the refs at it.
        let mut resolved: Vec<(String, usize)> = Vec::new();
        let mut i = 0;
        while i < g.nodes.len() {
            if let Node::Ref(r) = &g.nodes[i] {
                let r = r.clone();
                let target = match resolved.iter().find(|(k, _)| *k == r) {
                    Some((_, t)) => *t,
                    None => {
                        let def = resolve(schema, &r)?;
                        let t = g.compile(def, &r, 0)?;
                        resolved.push((r.clone(), t));
                        t
                    }
                };
                g.nodes[i] = Node::AnyOf(vec![target]);
            }
            i += 1;
        }
        Ok(g)
    }

    fn push(&mut self, n: Node) -> Result<usize, String> {
        if self.nodes.len() >= MAX_NODES {
            return Err(format!("the schema has more than {MAX_NODES} parts"));
        }
        self.nodes.push(n);
        Ok(self.nodes.len() - 1)
    }

    fn compile(&mut self, s: &Value, at: &str, depth: usize) -> Result<usize, String> {
        if depth > MAX_DEPTH {
            return Err(format!("{at}: the schema nests deeper than {MAX_DEPTH}"));
        }
        let obj = match s {
            Value::Bool(true) => return Ok(ANY),
            Value::Object(o) => o,
            other => return Err(format!("{at}: a schema must be an object, not {other}")),
        };
        for k in obj.keys() {
            let known = [
                "type",
                "properties",
                "required",
                "additionalProperties",
                "items",
                "minItems",
                "maxItems",
                "enum",
                "const",
                "anyOf",
                "oneOf",
                "$ref",
            ];
            if !known.contains(&k.as_str()) && !IGNORED.contains(&k.as_str()) {
                return Err(format!(
                    "{at}: the keyword '{k}' is not supported in constrained output"
                ));
            }
        }
        if let Some(r) = obj.get("$ref") {
            let r = r
                .as_str()
                .ok_or_else(|| format!("{at}.$ref: not a string"))?;
            return self.push(Node::Ref(r.to_string()));
        }
        if let Some(c) = obj.get("const") {
            return self.push(Node::Literals(vec![c.to_string()]));
        }
        if let Some(e) = obj.get("enum") {
            let list = e
                .as_array()
                .filter(|l| !l.is_empty())
                .ok_or_else(|| format!("{at}.enum: not a non-empty list"))?;
            return self.push(Node::Literals(list.iter().map(Value::to_string).collect()));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alts) = obj.get(key) {
                let list = alts
                    .as_array()
                    .filter(|l| !l.is_empty())
                    .ok_or_else(|| format!("{at}.{key}: not a non-empty list"))?;
                let id = self.push(Node::AnyOf(Vec::new()))?;
                let mut ids = Vec::new();
                for (i, a) in list.iter().enumerate() {
                    ids.push(self.compile(a, &format!("{at}.{key}[{i}]"), depth + 1)?);
                }
                self.nodes[id] = Node::AnyOf(ids);
                return Ok(id);
            }
        }
        let types: Vec<&str> = match obj.get("type") {
            None => vec![],
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(|| format!("{at}.type: {t} is not a string"))
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(format!("{at}.type: {other} is not a type name")),
        };
        if types.is_empty() {
            if obj.contains_key("properties") {
                return self.compile_type("object", obj, at, depth);
            }
            if obj.contains_key("items") {
                return self.compile_type("array", obj, at, depth);
            }
            return Ok(ANY);
        }
        if types.len() == 1 {
            return self.compile_type(types[0], obj, at, depth);
        }
        let id = self.push(Node::AnyOf(Vec::new()))?;
        let mut ids = Vec::new();
        for t in types {
            ids.push(self.compile_type(t, obj, at, depth)?);
        }
        self.nodes[id] = Node::AnyOf(ids);
        Ok(id)
    }

    fn compile_type(
        &mut self,
        ty: &str,
        obj: &serde_json::Map<String, Value>,
        at: &str,
        depth: usize,
    ) -> Result<usize, String> {
        let count = |k: &str| -> Result<Option<usize>, String> {
            match obj.get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n <= 1 << 20)
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| format!("{at}.{k}: {v} is not a count")),
            }
        };
        match ty {
            "null" => Ok(NULL),
            "boolean" => Ok(BOOL),
            "integer" => self.push(Node::Integer),
            "number" => self.push(Node::Number),
            "string" => self.push(Node::String),
            "array" => {
                let id = self.push(Node::Any)?;
                let items = match obj.get("items") {
                    None => ANY,
                    Some(s) => self.compile(s, &format!("{at}.items"), depth + 1)?,
                };
                let min = count("minItems")?.unwrap_or(0);
                let max = count("maxItems")?.unwrap_or(usize::MAX);
                if min > max {
                    return Err(format!("{at}: minItems {min} > maxItems {max}"));
                }
                self.nodes[id] = Node::Array { items, min, max };
                Ok(id)
            }
            "object" => {
                let id = self.push(Node::Any)?;
                let required: Vec<&str> = match obj.get("required") {
                    None => Vec::new(),
                    Some(Value::Array(r)) => r
                        .iter()
                        .map(|x| {
                            x.as_str()
                                .ok_or_else(|| format!("{at}.required: {x} is not a name"))
                        })
                        .collect::<Result<_, _>>()?,
                    Some(other) => return Err(format!("{at}.required: {other} is not a list")),
                };
                let props = match obj.get("properties") {
                    None => None,
                    Some(Value::Object(p)) => Some(p),
                    Some(other) => {
                        return Err(format!("{at}.properties: {other} is not an object"))
                    }
                };
                let node = match props {
                    Some(p) if !p.is_empty() => {
                        if let Some(r) = required.iter().find(|r| !p.contains_key(**r)) {
                            return Err(format!(
                                "{at}.required: '{r}' is not among the properties"
                            ));
                        }
                        let extra = obj.get("additionalProperties");
                        if extra.is_some_and(|e| e != &Value::Bool(false)) {
                            return Err(format!(
                                "{at}: additionalProperties beside properties is not supported \
                                 (set it to false)"
                            ));
                        }
                        let mut list = Vec::new();
                        for (name, s) in p {
                            let v =
                                self.compile(s, &format!("{at}.properties.{name}"), depth + 1)?;
                            // The name as written inside quotes: JSON-escaped.
                            let quoted = Value::String(name.clone()).to_string();
                            let inner = quoted[1..quoted.len() - 1].to_string();
                            list.push((inner, v, required.contains(&name.as_str())));
                        }
                        Node::Object {
                            props: list,
                            additional: None,
                        }
                    }
                    _ => {
                        let additional = match obj.get("additionalProperties") {
                            None | Some(Value::Bool(true)) => Some(ANY),
                            Some(Value::Bool(false)) => None,
                            Some(s) => Some(self.compile(
                                s,
                                &format!("{at}.additionalProperties"),
                                depth + 1,
                            )?),
                        };
                        Node::Object {
                            props: Vec::new(),
                            additional,
                        }
                    }
                };
                self.nodes[id] = node;
                Ok(id)
            }
            other => Err(format!("{at}.type: '{other}' is not a JSON Schema type")),
        }
    }
}

/// The schema a `$ref` ("#/$defs/Name", "#/definitions/Name") points to.
fn resolve<'a>(root: &'a Value, r: &str) -> Result<&'a Value, String> {
    let path = r
        .strip_prefix("#/")
        .ok_or_else(|| format!("$ref '{r}': only references into this schema (#/...) work"))?;
    let mut v = root;
    for part in path.split('/') {
        let part = part.replace("~1", "/").replace("~0", "~");
        v = v
            .get(&part)
            .ok_or_else(|| format!("$ref '{r}': nothing at '{part}'"))?;
    }
    Ok(v)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum NumState {
    /// After '-'.
    Minus,
    Zero,
    Int,
    /// After '.'.
    Dot,
    Frac,
    /// After 'e'.
    E,
    ESign,
    Exp,
}

impl NumState {
    fn complete(self) -> bool {
        matches!(
            self,
            NumState::Zero | NumState::Int | NumState::Frac | NumState::Exp
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pos {
    /// Just after the opening bracket.
    Open,
    /// After a key (objects).
    AfterKey,
    /// After ':' (objects).
    AfterColon,
    AfterValue,
    AfterComma,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Frame {
    /// A value of the node is expected next.
    Expect(usize),
    /// The rest of a literal: the node's literal number `lit`, from byte `at`.
    Lit {
        node: usize,
        lit: usize,
        at: usize,
    },
    /// The rest of a schema object's property name, then its closing quote.
    Key {
        node: usize,
        prop: usize,
        at: usize,
    },
    Str {
        escape: u8,
    },
    Num {
        state: NumState,
        integer: bool,
    },
    Array {
        node: usize,
        n: usize,
        pos: Pos,
    },
    /// `next`: the first property not yet written (schema objects).
    Object {
        node: usize,
        next: usize,
        pos: Pos,
    },
}

/// Where a constrained generation is: the live parse stacks.
#[derive(Debug, Clone)]
pub struct JsonState {
    stacks: Vec<(Vec<Frame>, u8)>,
}

impl JsonState {
    pub fn new(g: &JsonGrammar) -> Self {
        JsonState {
            stacks: vec![(vec![Frame::Expect(g.root)], 0)],
        }
    }

    /// Whether the text so far is a complete document (generation may end here).
    pub fn accepting(&self) -> bool {
        self.stacks.iter().any(|(s, _)| match s.as_slice() {
            [] => true,
            [Frame::Num { state, .. }] => state.complete(),
            _ => false,
        })
    }

    /// Feeds `text`; false (and the state is then dead) when no valid document starts so.
    pub fn feed(&mut self, g: &JsonGrammar, text: &str) -> bool {
        for c in text.chars() {
            let mut next = Vec::new();
            for (stack, ws) in self.stacks.drain(..) {
                let ws = if matches!(c, ' ' | '\n' | '\t' | '\r') {
                    if ws >= MAX_WS {
                        continue;
                    }
                    ws + 1
                } else {
                    0
                };
                step(g, stack, c, &mut |s| {
                    let item = (s, ws);
                    if next.len() < MAX_STACKS && !next.contains(&item) {
                        next.push(item);
                    }
                });
            }
            self.stacks = next;
            if self.stacks.is_empty() {
                return false;
            }
        }
        true
    }
}

fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\n' | '\t' | '\r')
}

/// Advances one stack by `c`, giving each way it can continue to `out`.
fn step(g: &JsonGrammar, mut stack: Vec<Frame>, c: char, out: &mut dyn FnMut(Vec<Frame>)) {
    let Some(top) = stack.pop() else {
        return; // complete: nothing may follow
    };
    match top {
        Frame::Expect(node) => {
            if is_ws(c) {
                stack.push(Frame::Expect(node));
                return out(stack);
            }
            start_value(g, stack, node, c, out)
        }
        Frame::Lit { node, lit, at } => {
            let Node::Literals(lits) = &g.nodes[node] else {
                return;
            };
            let text = &lits[lit];
            if text[at..].starts_with(c) {
                let at = at + c.len_utf8();
                if at < text.len() {
                    stack.push(Frame::Lit { node, lit, at });
                }
                out(stack)
            }
        }
        Frame::Key { node, prop, at } => {
            let Node::Object { props, .. } = &g.nodes[node] else {
                return;
            };
            let name = &props[prop].0;
            if at == name.len() {
                if c == '"' {
                    out(stack) // the key is complete; the object frame waits for ':'
                }
            } else if name[at..].starts_with(c) {
                stack.push(Frame::Key {
                    node,
                    prop,
                    at: at + c.len_utf8(),
                });
                out(stack)
            }
        }
        Frame::Str { escape } => {
            let next = match (escape, c) {
                (0, '"') => return out(stack),
                (0, '\\') => 1,
                (0, c) if (c as u32) < 0x20 => return,
                (0, _) => 0,
                (1, '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't') => 0,
                (1, 'u') => 5,
                (2..=5, c) if c.is_ascii_hexdigit() => {
                    if escape == 2 {
                        0
                    } else {
                        escape - 1
                    }
                }
                _ => return,
            };
            stack.push(Frame::Str { escape: next });
            out(stack)
        }
        Frame::Num { state, integer } => {
            use NumState::*;
            let next = match (state, c) {
                (Minus, '0') => Some(Zero),
                (Minus, '1'..='9') => Some(Int),
                (Int, '0'..='9') => Some(Int),
                (Zero | Int, '.') if !integer => Some(Dot),
                (Zero | Int | Frac, 'e' | 'E') if !integer => Some(E),
                (Dot | Frac, '0'..='9') => Some(Frac),
                (E, '+' | '-') => Some(ESign),
                (E | ESign | Exp, '0'..='9') => Some(Exp),
                _ => None,
            };
            match next {
                Some(s) => {
                    stack.push(Frame::Num { state: s, integer });
                    out(stack)
                }
                // The number ends here; the character belongs to what holds it.
                None if state.complete() && !stack.is_empty() => step(g, stack, c, out),
                None => {}
            }
        }
        Frame::Array { node, n, pos } => {
            let Node::Array { items, min, max } = g.nodes[node] else {
                return;
            };
            if is_ws(c) {
                stack.push(Frame::Array { node, n, pos });
                return out(stack);
            }
            match (pos, c) {
                (Pos::Open | Pos::AfterValue, ']') if n >= min => out(stack),
                (Pos::AfterValue, ',') if n < max => {
                    stack.push(Frame::Array {
                        node,
                        n,
                        pos: Pos::AfterComma,
                    });
                    out(stack)
                }
                (Pos::Open | Pos::AfterComma, _) if n < max => {
                    stack.push(Frame::Array {
                        node,
                        n: n + 1,
                        pos: Pos::AfterValue,
                    });
                    start_value(g, stack, items, c, out)
                }
                _ => {}
            }
        }
        Frame::Object { node, next, pos } => {
            let Node::Object { props, additional } = &g.nodes[node] else {
                return;
            };
            if is_ws(c) {
                stack.push(Frame::Object { node, next, pos });
                return out(stack);
            }
            let required_left = props[next.min(props.len())..].iter().any(|p| p.2);
            match (pos, c) {
                (Pos::Open | Pos::AfterValue, '}') if !required_left => out(stack),
                (Pos::AfterValue, ',') => {
                    let more = if props.is_empty() {
                        additional.is_some()
                    } else {
                        next < props.len()
                    };
                    if more {
                        stack.push(Frame::Object {
                            node,
                            next,
                            pos: Pos::AfterComma,
                        });
                        out(stack)
                    }
                }
                (Pos::Open | Pos::AfterComma, '"') => {
                    if props.is_empty() {
                        if additional.is_some() {
                            stack.push(Frame::Object {
                                node,
                                next,
                                pos: Pos::AfterKey,
                            });
                            stack.push(Frame::Str { escape: 0 });
                            out(stack)
                        }
                        return;
                    }
                    // Any property from `next` up to the first required one may come next.
                    for (j, p) in props.iter().enumerate().skip(next) {
                        let mut s = stack.clone();
                        s.push(Frame::Object {
                            node,
                            next: j,
                            pos: Pos::AfterKey,
                        });
                        s.push(Frame::Key {
                            node,
                            prop: j,
                            at: 0,
                        });
                        out(s);
                        if p.2 {
                            break;
                        }
                    }
                }
                (Pos::AfterKey, ':') => {
                    stack.push(Frame::Object {
                        node,
                        next,
                        pos: Pos::AfterColon,
                    });
                    out(stack)
                }
                (Pos::AfterColon, _) => {
                    let (value, after) = if props.is_empty() {
                        match additional {
                            Some(a) => (*a, next),
                            None => return,
                        }
                    } else {
                        (props[next].1, next + 1)
                    };
                    stack.push(Frame::Object {
                        node,
                        next: after,
                        pos: Pos::AfterValue,
                    });
                    start_value(g, stack, value, c, out)
                }
                _ => {}
            }
        }
    }
}

/// The first character `c` of a value of `node`.
fn start_value(
    g: &JsonGrammar,
    mut stack: Vec<Frame>,
    node: usize,
    c: char,
    out: &mut dyn FnMut(Vec<Frame>),
) {
    match &g.nodes[node] {
        Node::Any => match c {
            '{' => {
                stack.push(Frame::Object {
                    node: ANY_OBJECT,
                    next: 0,
                    pos: Pos::Open,
                });
                out(stack)
            }
            '[' => {
                stack.push(Frame::Array {
                    node: ANY_ARRAY,
                    n: 0,
                    pos: Pos::Open,
                });
                out(stack)
            }
            '"' => {
                stack.push(Frame::Str { escape: 0 });
                out(stack)
            }
            '-' | '0'..='9' => number(stack, c, false, out),
            _ => start_value(g, stack, ANY_LITERAL, c, out),
        },
        Node::Integer => number(stack, c, true, out),
        Node::Number => number(stack, c, false, out),
        Node::String => {
            if c == '"' {
                stack.push(Frame::Str { escape: 0 });
                out(stack)
            }
        }
        Node::Literals(lits) => {
            for (i, l) in lits.iter().enumerate() {
                if l.starts_with(c) {
                    let mut s = stack.clone();
                    if l.len() > c.len_utf8() {
                        s.push(Frame::Lit {
                            node,
                            lit: i,
                            at: c.len_utf8(),
                        });
                    }
                    out(s);
                }
            }
        }
        Node::Array { .. } => {
            if c == '[' {
                stack.push(Frame::Array {
                    node,
                    n: 0,
                    pos: Pos::Open,
                });
                out(stack)
            }
        }
        Node::Object { .. } => {
            if c == '{' {
                stack.push(Frame::Object {
                    node,
                    next: 0,
                    pos: Pos::Open,
                });
                out(stack)
            }
        }
        Node::AnyOf(alts) => {
            for &a in alts {
                start_value(g, stack.clone(), a, c, out);
            }
        }
        Node::Ref(_) => {}
    }
}

fn number(mut stack: Vec<Frame>, c: char, integer: bool, out: &mut dyn FnMut(Vec<Frame>)) {
    let state = match c {
        '-' => NumState::Minus,
        '0' => NumState::Zero,
        '1'..='9' => NumState::Int,
        _ => return,
    };
    stack.push(Frame::Num { state, integer });
    out(stack)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn accepts(g: &JsonGrammar, doc: &str) -> bool {
        let mut s = JsonState::new(g);
        s.feed(g, doc) && s.accepting()
    }

    /// Whether `doc` is a prefix some valid document continues.
    fn live(g: &JsonGrammar, doc: &str) -> bool {
        JsonState::new(g).feed(g, doc)
    }

    #[test]
    fn json_object_mode_takes_any_object_and_nothing_else() {
        let g = JsonGrammar::object();
        for doc in [
            r#"{}"#,
            r#"{"a": [1, -2.5e3, 0, 1E+2, true, false, null, "x\"y\u00e9"], "b": {"c": {}}}"#,
            "{\n  \"k\": \"v\"\n}",
        ] {
            assert!(accepts(&g, doc), "{doc}");
            serde_json::from_str::<Value>(doc).unwrap();
        }
        for doc in [
            "[1]",
            "\"s\"",
            "{\"a\" 1}",
            "{\"a\": 01}",
            "{\"a\": 1,}",
            "{\"a\": tru}",
            "{\"a\": \"\u{1}\"}",
            "{\"a\": -}",
            "{\"a\": 1.}",
            "{} {}",
            "{\"a\": \"\\x\"}",
        ] {
            assert!(!accepts(&g, doc), "{doc}");
        }
        assert!(live(&g, "{\"a\": [1, 2"));
        assert!(!JsonState::new(&g).accepting());
        // Endless whitespace is cut off.
        assert!(!live(&g, &format!("{{{}", " ".repeat(40))));
    }

    #[test]
    fn a_schema_fixes_keys_types_order_and_required_fields() {
        let schema = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "nickname": {"type": ["string", "null"]},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                "kind": {"const": "person"}
            },
            "required": ["name", "age", "kind"],
            "additionalProperties": false
        });
        let g = JsonGrammar::from_schema(&schema).unwrap();
        for doc in [
            r#"{"name": "Ann", "age": 41, "kind": "person"}"#,
            r#"{"name": "Ann", "age": -3, "nickname": null, "tags": ["a", "b"], "kind": "person"}"#,
            r#"{"name":"A\"n","age":0,"nickname":"x","kind":"person"}"#,
        ] {
            assert!(accepts(&g, doc), "{doc}");
        }
        for doc in [
            r#"{"age": 41, "name": "Ann", "kind": "person"}"#, // out of order
            r#"{"name": "Ann", "kind": "person"}"#,            // age missing
            r#"{"name": "Ann", "age": 4.5, "kind": "person"}"#, // not an integer
            r#"{"name": "Ann", "age": 4, "tags": ["c"], "kind": "person"}"#,
            r#"{"name": "Ann", "age": 4, "tags": ["a", "a", "b"], "kind": "person"}"#,
            r#"{"name": "Ann", "age": 4, "kind": "robot"}"#,
            r#"{"name": "Ann", "age": 4, "kind": "person", "extra": 1}"#,
            r#"{"name": 5}"#,
        ] {
            assert!(!accepts(&g, doc), "{doc}");
        }
    }

    #[test]
    fn refs_anyof_and_nesting() {
        let schema = json!({
            "$defs": {"node": {"type": "object", "properties": {
                "v": {"type": "number"},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}
            }, "required": ["v"]}},
            "anyOf": [{"$ref": "#/$defs/node"}, {"type": "boolean"}]
        });
        let g = JsonGrammar::from_schema(&schema).unwrap();
        assert!(accepts(
            &g,
            r#"{"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": []}]}"#
        ));
        assert!(accepts(&g, "true"));
        assert!(!accepts(&g, r#"{"v": 1, "kids": [{"x": 2}]}"#));
        // A number at the root is complete without anything after it.
        let n = JsonGrammar::from_schema(&json!({"type": "integer"})).unwrap();
        assert!(accepts(&n, "42") && !accepts(&n, "42.0") && !accepts(&n, "-"));
    }

    #[test]
    fn unsupported_or_broken_schemas_are_refused_by_name() {
        for (schema, want) in [
            (json!(5), "must be an object"),
            (
                json!({"type": "bogus"}),
                "'bogus' is not a JSON Schema type",
            ),
            (
                json!({"type": "string", "pattern": "a+"}),
                "'pattern' is not supported",
            ),
            (
                json!({"type": "object", "properties": 3}),
                "properties: 3 is not an object",
            ),
            (
                json!({"type": "object", "properties": {"a": {}}, "required": ["b"]}),
                "'b' is not among",
            ),
            (json!({"$ref": "#/$defs/missing"}), "nothing at '$defs'"),
            (
                json!({"$ref": "http://x"}),
                "only references into this schema",
            ),
            (json!({"enum": []}), "enum: not a non-empty list"),
            (
                json!({"type": "array", "minItems": 3, "maxItems": 1}),
                "minItems 3 > maxItems 1",
            ),
        ] {
            let e = JsonGrammar::from_schema(&schema).unwrap_err();
            assert!(e.contains(want), "{schema}: {e}");
        }
        let mut deep = json!({"type": "string"});
        for _ in 0..100 {
            deep = json!({"type": "array", "items": deep});
        }
        assert!(JsonGrammar::from_schema(&deep)
            .unwrap_err()
            .contains("deeper"));
    }
}
