//! Chat templates: the Jinja template a model ships (GGUF `tokenizer.chat_template` or
//! tokenizer_config.json `chat_template`), rendered with minijinja in the Hugging Face way.

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
    bos: Option<String>,
    eos: Option<String>,
    file: String,
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
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TokenizerError::Template {
                file: file.into(),
                what: format!("{e:#}"),
            })?;
        Ok(Self {
            env,
            bos,
            eos,
            file: file.into(),
        })
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

    #[test]
    fn syntax_error_names_the_file() {
        let err = ChatTemplate::new("{% for x in %}", None, None, "model.gguf")
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.gguf"), "{err}");
    }
}
