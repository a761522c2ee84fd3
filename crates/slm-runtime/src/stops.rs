//! A generation's text as its tokens arrive, cut at the first stop string. Text that could
//! still be the start of a stop string is held back until it cannot.

use slm_tokenizer::{StreamDecoder, Tokenizer, TokenizerError};

pub struct StopText<'t> {
    decoder: StreamDecoder<'t>,
    stop: Vec<String>,
    text: String,
    shown: usize,
}

impl<'t> StopText<'t> {
    pub fn new(tok: &'t Tokenizer, stop: Vec<String>) -> Self {
        Self {
            decoder: StreamDecoder::new(tok),
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            shown: 0,
        }
    }

    /// Adds a generated token. Returns the text that may now be shown (possibly empty) and
    /// whether a stop string has appeared (the text is then cut before it, and is final).
    pub fn push(&mut self, id: u32) -> Result<(String, bool), TokenizerError> {
        self.text.push_str(&self.decoder.push(id)?);
        if let Some(pos) = self.stop.iter().filter_map(|s| self.text.find(s)).min() {
            self.text.truncate(pos);
            return Ok((self.release(self.text.len()), true));
        }
        let hold = self
            .stop
            .iter()
            .map(|s| partial_suffix(&self.text, s))
            .max()
            .unwrap_or(0);
        Ok((self.release(self.text.len() - hold), false))
    }

    /// What is still held back, when generation ends without a stop string.
    pub fn flush(&mut self) -> String {
        self.release(self.text.len())
    }

    /// All text so far (cut at a stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn release(&mut self, upto: usize) -> String {
        let out = self.text.get(self.shown..upto).unwrap_or("").to_string();
        self.shown = self.shown.max(upto);
        out
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_stop_suffix() {
        assert_eq!(partial_suffix("hello wor", "world"), 3);
        assert_eq!(partial_suffix("hello", "world"), 0);
        assert_eq!(partial_suffix("x<|im", "<|im_end|>"), 4);
    }
}
