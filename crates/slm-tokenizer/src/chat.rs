//! Chat templates: the Jinja template a model ships (GGUF `tokenizer.chat_template` or
//! tokenizer_config.json `chat_template`), rendered with minijinja in the Hugging Face way.

use std::ops::Range;

use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::{Result, TokenizerError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template has `{% generation %}` markers around what the assistant writes.
    marked: bool,
    bos: Option<String>,
    eos: Option<String>,
    file: String,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("file", &self.file)
            .finish()
    }
}

fn raise_exception(msg: String) -> std::result::Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported with the file it came from.
    pub fn new(source: &str, bos: Option<String>, eos: Option<String>, file: &str) -> Result<Self> {
        let mut env = Environment::new();
        // Python string methods (.strip(), .startswith(), ...) that HF templates call.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // A template is code from the model file: a budget of instructions per rendering
        // turns a runaway loop into an error instead of a hang.
        env.set_fuel(Some(slm_format::limits::TEMPLATE_FUEL));
        let bad = |e: Error| TokenizerError::Template {
            file: file.into(),
            what: format!("{e:#}"),
        };
        // Hugging Face's `{% generation %}` is an extension of its own Jinja: rendered as
        // nothing for prompts, and as sentinels around the assistant's text for training.
        let plain = replace_generation_tags(source, "", "");
        let marked = plain.is_some();
        match plain {
            Some(plain) => {
                env.add_template_owned("chat", plain).map_err(bad)?;
                let marks = replace_generation_tags(source, "{{ '\u{e000}' }}", "{{ '\u{e001}' }}")
                    .expect("has markers");
                env.add_template_owned("marked", marks).map_err(bad)?;
            }
            None => env
                .add_template_owned("chat", source.to_string())
                .map_err(bad)?,
        }
        Ok(Self {
            env,
            marked,
            bos,
            eos,
            file: file.into(),
            source: source.into(),
        })
    }

    /// The template as written (markers included): what tokenizer_config.json keeps.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Length of the template's source text.
    pub fn source_len(&self) -> usize {
        self.env
            .get_template("chat")
            .map_or(0, |t| t.source().chars().count())
    }

    /// The prompt text for `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt` is set.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in new()");
        self.render_with(&tmpl, messages, add_generation_prompt)
    }

    fn render_with(
        &self,
        tmpl: &minijinja::Template,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.clone().unwrap_or_default(),
            eos_token => self.eos.clone().unwrap_or_default(),
        })
        .map_err(|e| TokenizerError::Template {
            file: self.file.clone(),
            what: format!("{e:#}"),
        })
    }
}

/// A conversation rendered for training: its text, and the byte ranges of it that the
/// assistant writes (the loss's tokens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingChat {
    pub text: String,
    pub assistant: Vec<Range<usize>>,
}

const OPEN: char = '\u{e000}';
const CLOSE: char = '\u{e001}';

impl ChatTemplate {
    /// `messages` rendered whole, with the spans of text each assistant turn contributes.
    /// With `{% generation %}` markers in the template, the marked text; without, by
    /// rendering prefixes (TRL's and axolotl's way for templates without markers): turn i's
    /// span runs from the end of the conversation before it with the generation prompt to
    /// the end of the conversation through it, less trailing whitespace (the newline after
    /// an end-of-turn token, which generation never produces). A template that renders
    /// earlier turns differently once later ones follow is an error: its spans cannot be
    /// found that way.
    pub fn render_for_training(&self, messages: &[Message]) -> Result<TrainingChat> {
        let sentinel = |m: &Message| m.content.contains([OPEN, CLOSE]);
        if self.marked && !messages.iter().any(sentinel) {
            return self.render_marked(messages);
        }
        let text = self.render(messages, false)?;
        let mut assistant = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !text.starts_with(&through) {
                return Err(TokenizerError::Template {
                    file: self.file.clone(),
                    what: format!(
                        "the template renders the conversation before message {i} differently \
                         once later messages follow, so the assistant's text cannot be found by \
                         rendering prefixes (a template with {{% generation %}} markers can)"
                    ),
                });
            }
            let end = through.trim_end().len().max(before.len());
            assistant.push(before.len()..end);
        }
        Ok(TrainingChat { text, assistant })
    }

    fn render_marked(&self, messages: &[Message]) -> Result<TrainingChat> {
        let tmpl = self.env.get_template("marked").expect("added in new()");
        let raw = self.render_with(&tmpl, messages, false)?;
        let (mut text, mut assistant, mut open) = (String::new(), Vec::new(), None);
        for c in raw.chars() {
            match c {
                OPEN => open = Some(text.len()),
                CLOSE => {
                    if let Some(start) = open.take() {
                        assistant.push(start..text.len());
                    }
                }
                _ => text.push(c),
            }
        }
        assistant.retain(|r: &Range<usize>| !r.is_empty());
        Ok(TrainingChat { text, assistant })
    }
}

/// `source` with each `{% generation %}` and `{% endgeneration %}` tag replaced by `open`
/// and `close`, keeping the whitespace Jinja's block-tag rules (trim_blocks, lstrip_blocks,
/// `-` markers) would have removed around them; `None` when it has no such tags.
fn replace_generation_tags(source: &str, open: &str, close: &str) -> Option<String> {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        // The closing "%}" after the opening "{%" (not one overlapping it, as in "{%}").
        let Some(len) = rest[at + 2..].find("%}").map(|e| e + 4) else {
            break;
        };
        let tag = &rest[at..at + len];
        let inner = tag[2..len - 2]
            .trim_matches(|c| c == '-' || c == '+')
            .trim();
        let replacement = match inner {
            "generation" => open,
            "endgeneration" => close,
            _ => {
                out.push_str(&rest[..at + len]);
                rest = &rest[at + len..];
                continue;
            }
        };
        found = true;
        let mut before = &rest[..at];
        if tag.starts_with("{%-") {
            before = before.trim_end();
        } else if !tag.starts_with("{%+") {
            // lstrip_blocks: spaces and tabs from the start of the tag's line.
            let line = before.rfind('\n').map_or(0, |n| n + 1);
            if before[line..].chars().all(|c| c == ' ' || c == '\t') && (line > 0 || out.is_empty())
            {
                before = &before[..line];
            }
        }
        out.push_str(before);
        out.push_str(replacement);
        rest = &rest[at + len..];
        if tag.ends_with("-%}") {
            rest = rest.trim_start();
        } else if !tag.ends_with("+%}") {
            // trim_blocks: the first newline after a block tag.
            rest = rest.strip_prefix('\n').unwrap_or(rest);
        }
    }
    out.push_str(rest);
    found.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML, None, None, "t").unwrap();
        let out = t.render(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_long_chat_renders_within_the_fuel_and_a_runaway_loop_does_not() {
        let t = ChatTemplate::new(CHATML, None, None, "t").unwrap();
        let messages: Vec<Message> = (0..2000)
            .map(|i| Message::new(if i % 2 == 0 { "user" } else { "assistant" }, "some words"))
            .collect();
        assert!(t.render(&messages, true).unwrap().ends_with("assistant\n"));
        let runaway = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            None,
            None,
            "t.gguf",
        )
        .unwrap();
        let e = runaway
            .render(&messages[..1], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.gguf") && e.contains("fuel"), "{e}");
    }

    #[test]
    fn python_methods_and_exceptions() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip() }}",
            None,
            None,
            "t",
        )
        .unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  x ")], false).unwrap(),
            "x"
        );
        let err = t
            .render(&[Message::new("system", "s")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("first must be user"), "{err}");
    }

    /// Malformed tags are minijinja's to report, not the marker rewriting's to trip on.
    #[test]
    fn malformed_tags_are_syntax_errors() {
        for source in ["{%}", "{%", "x {%-%} {% generation", "{%}{% generation %}"] {
            let err = ChatTemplate::new(source, None, None, "model.gguf")
                .unwrap_err()
                .to_string();
            assert!(err.contains("model.gguf"), "{source}: {err}");
        }
    }

    #[test]
    fn syntax_error_names_the_file() {
        let err = ChatTemplate::new("{% for x in %}", None, None, "model.gguf")
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.gguf"), "{err}");
    }

    /// SmolLM2-Instruct's template (ChatML, with a default system turn), from its GGUF.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    /// Meta-Llama-3-8B-Instruct's template.
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    fn conversation() -> Vec<Message> {
        vec![
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello! How can I help?"),
            Message::new("user", "Name a colour."),
            Message::new("assistant", " Blue. "),
        ]
    }

    fn spans(t: &ChatTemplate, m: &[Message]) -> Vec<String> {
        let r = t.render_for_training(m).unwrap();
        assert_eq!(r.text, t.render(m, false).unwrap());
        r.assistant
            .iter()
            .map(|s| r.text[s.clone()].to_string())
            .collect()
    }

    #[test]
    fn assistant_text_by_rendering_prefixes() {
        let chatml = ChatTemplate::new(SMOLLM2, None, None, "t").unwrap();
        assert_eq!(
            spans(&chatml, &conversation()),
            ["Hello! How can I help?<|im_end|>", " Blue. <|im_end|>"]
        );
        let llama3 =
            ChatTemplate::new(LLAMA3, Some("<|begin_of_text|>".into()), None, "t").unwrap();
        // Llama 3's template trims each message.
        assert_eq!(
            spans(&llama3, &conversation()),
            ["Hello! How can I help?<|eot_id|>", "Blue.<|eot_id|>"]
        );
        // A system turn, and a conversation that ends with a user turn: no span for it.
        let mut m = conversation();
        m.insert(0, Message::new("system", "Be brief."));
        m.push(Message::new("user", "Thanks"));
        assert_eq!(spans(&chatml, &m).len(), 2);
        assert_eq!(spans(&llama3, &m)[1], "Blue.<|eot_id|>");
    }

    #[test]
    fn assistant_text_by_generation_markers() {
        // ChatML with Hugging Face's markers, written over several lines as such templates
        // are: block-tag whitespace rules apply to the markers too.
        let marked = ChatTemplate::new(
            "{%- for message in messages %}\n  {%- if message['role'] == 'assistant' %}\n    {{- '<|im_start|>assistant\\n' }}\n    {%- generation %}\n    {{- message['content'] + '<|im_end|>' }}\n    {%- endgeneration %}\n    {{- '\\n' }}\n  {%- else %}\n    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n  {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
            None,
            None,
            "t",
        )
        .unwrap();
        let plain = ChatTemplate::new(CHATML, None, None, "t").unwrap();
        let m = conversation();
        assert_eq!(
            marked.render(&m, true).unwrap(),
            plain.render(&m, true).unwrap()
        );
        let r = marked.render_for_training(&m).unwrap();
        assert_eq!(r.text, plain.render(&m, false).unwrap());
        let got: Vec<&str> = r.assistant.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(
            got,
            ["Hello! How can I help?<|im_end|>", " Blue. <|im_end|>"]
        );
        // Markers alone on their lines: lstrip_blocks and trim_blocks remove their indent
        // and newline, as Jinja does for any block tag.
        let lines = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'assistant' %}\n  {% generation %}\n{{ m.content }}{% endgeneration %}\n{% else %}{{ m.content }}{% endif %}{% endfor %}",
            None,
            None,
            "t",
        )
        .unwrap();
        let m = &conversation()[..2];
        assert_eq!(lines.render(m, false).unwrap(), "HiHello! How can I help?");
        assert_eq!(spans(&lines, m), ["Hello! How can I help?"]);
    }

    #[test]
    fn a_template_that_rewrites_earlier_turns_is_refused() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m.content }}{% endfor %}",
            None,
            None,
            "model.gguf",
        )
        .unwrap();
        let e = t
            .render_for_training(&conversation())
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.gguf") && e.contains("message 1"), "{e}");
    }
}
