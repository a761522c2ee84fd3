//! Chat fine-tuning data (`objective.kind = "sft"`): conversations (`{"messages": [...]}`)
//! rendered with the parent's chat template, encoded with the loss on what the assistant
//! writes, and packed several to a row.
//!
//! - Loss mask: the template's `{% generation %}` markers where it has them, else the text
//!   each assistant turn adds (slm_tokenizer's `render_for_training`). The text is tokenized
//!   a span at a time, as `slm chat` tokenizes a prompt and then generates the reply: a
//!   token never straddles the prompt and the reply.
//! - Packing (default): conversations placed into rows of `positions` by best-fit
//!   decreasing length; each attends only within itself and counts its positions from 0
//!   (`Trainer::set_starts`), so packing changes the speed, not what is learned.
//! - Truncation: a conversation longer than `positions` keeps its first `positions` tokens
//!   (the system prompt and first turns; a reply cut short trains on its beginning). One
//!   left with no assistant token is left out and counted.

use std::collections::BTreeMap;

use slm_data::tasks;
use slm_kernels::head::IGNORE;
use slm_model::Head;
use slm_tokenizer::{Message, Tokenizer};

use crate::recipe::Recipe;
use crate::run::{Result, TrainError};
use crate::task::{hold_out, Example, TaskData};

/// One conversation's tokens, and per token its next-token target (`IGNORE` outside the
/// assistant's text and at the end).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub targets: Vec<u32>,
}

/// `messages` rendered with `tok`'s chat template and tokenized span by span.
pub fn encode(tok: &Tokenizer, messages: &[Message]) -> Result<Encoded> {
    let template = tok.chat_template.as_ref().ok_or_else(|| {
        TrainError::Setup("the parent's tokenizer has no chat template; sft renders conversations with it (tokenizer_config.json chat_template)".into())
    })?;
    let err = |e: slm_tokenizer::TokenizerError| TrainError::Setup(e.to_string());
    let chat = template.render_for_training(messages).map_err(err)?;
    let (mut ids, mut scored) = (Vec::new(), Vec::new());
    let mut at = 0;
    let spans = chat
        .assistant
        .iter()
        .flat_map(|s| [(s.start, false), (s.end, true)]);
    // Each stretch once, in order, even if a template's spans were to overlap.
    for (end, assistant) in spans.chain([(chat.text.len(), false)]) {
        if end > at {
            let part = tok.encode(&chat.text[at..end], false).map_err(err)?;
            scored.extend(std::iter::repeat_n(assistant, part.len()));
            ids.extend(part);
            at = end;
        }
    }
    let targets = (0..ids.len())
        .map(|p| match ids.get(p + 1) {
            Some(&next) if scored[p + 1] => next,
            _ => IGNORE,
        })
        .collect();
    Ok(Encoded { ids, targets })
}

fn messages(turns: Vec<tasks::Turn>) -> Vec<Message> {
    turns
        .into_iter()
        .map(|t| Message::new(&t.role, t.content))
        .collect()
}

/// The run's chat data: training and validation conversations encoded, cut to `positions`
/// (model.context, else the longest conversation within `max_positions`), and packed when
/// `pack`.
pub fn load(
    recipe: &Recipe,
    tok: &Tokenizer,
    pad: u32,
    max_positions: usize,
    pack: bool,
) -> Result<TaskData> {
    let train_path = recipe.data.train.as_deref().expect("validated");
    let train = tasks::read_chat(train_path)?;
    let (train, valid) = match &recipe.data.valid {
        Some(p) => (train, tasks::read_chat(p)?),
        None if train.len() < 2 => {
            return Err(TrainError::Setup(format!(
                "{}: {} conversation(s); holding some out for validation needs at least 2, or give data.valid",
                train_path.display(),
                train.len()
            )))
        }
        None => hold_out(train, recipe),
    };
    let enc = |rows: Vec<Vec<tasks::Turn>>| -> Result<Vec<Encoded>> {
        rows.into_iter()
            .map(|turns| encode(tok, &messages(turns)))
            .collect()
    };
    let (train, valid) = (enc(train)?, enc(valid)?);
    let longest = train.iter().chain(&valid).map(|e| e.ids.len()).max();
    let positions = recipe
        .model
        .context
        .unwrap_or_else(|| longest.unwrap_or(1).min(max_positions))
        .max(2);
    let (mut truncated, mut unscored) = (0, 0);
    let mut cut = |rows: Vec<Encoded>| -> Vec<Encoded> {
        rows.into_iter()
            .filter_map(|mut e| {
                if e.ids.len() > positions {
                    truncated += 1;
                    e.ids.truncate(positions);
                    e.targets.truncate(positions);
                }
                if e.targets.iter().all(|&t| t == IGNORE) {
                    unscored += 1;
                    return None;
                }
                Some(e)
            })
            .collect()
    };
    let (train, valid) = (cut(train), cut(valid));
    if train.is_empty() || valid.is_empty() {
        return Err(TrainError::Setup(format!(
            "{}: {} training and {} validation conversations have assistant tokens within \
             {positions} positions; both need at least one",
            train_path.display(),
            train.len(),
            valid.len()
        )));
    }
    let rows = |e: Vec<Encoded>| match pack {
        true => pack_rows(e, positions, pad),
        false => e.into_iter().map(|e| row(&[e], positions, pad)).collect(),
    };
    let mut valid = rows(valid);
    valid.sort_by_key(|e| e.len);
    Ok(TaskData {
        head: Head::Lm,
        train: rows(train),
        valid,
        positions,
        skipped: 0,
        truncated_rows: truncated,
        truncated_words: 0,
        unscored,
        class_weights: None,
    })
}

/// Conversations one after another in a row of `positions`, padded; `starts` when there is
/// more than one.
fn row(convs: &[Encoded], positions: usize, pad: u32) -> Example {
    let (mut inputs, mut targets, mut starts) = (Vec::new(), Vec::new(), Vec::new());
    for c in convs {
        starts.extend(std::iter::repeat_n(inputs.len() as u32, c.ids.len()));
        inputs.extend(&c.ids);
        targets.extend(&c.targets);
    }
    let len = inputs.len();
    debug_assert!(len <= positions);
    // Padding is a sequence of its own: it sees no conversation, and none sees it.
    starts.resize(positions, len as u32);
    inputs.resize(positions, pad);
    targets.resize(positions, IGNORE);
    Example {
        inputs,
        targets,
        len,
        starts: (convs.len() > 1).then_some(starts),
    }
}

/// Best-fit decreasing: each conversation, longest first, into the row with the least room
/// that holds it (a new row when none does). The order is fixed by the data alone.
fn pack_rows(mut convs: Vec<Encoded>, positions: usize, pad: u32) -> Vec<Example> {
    convs.sort_by_key(|c| std::cmp::Reverse(c.ids.len()));
    let mut rows: Vec<Vec<Encoded>> = Vec::new();
    // Room left -> rows with that much room.
    let mut room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for c in convs {
        let len = c.ids.len();
        match room.range(len..).next().map(|(&r, _)| r) {
            Some(left) => {
                let list = room.get_mut(&left).expect("found");
                let r = list.pop().expect("non-empty");
                if list.is_empty() {
                    room.remove(&left);
                }
                rows[r].push(c);
                room.entry(left - len).or_default().push(r);
            }
            None => {
                rows.push(vec![c]);
                room.entry(positions - len)
                    .or_default()
                    .push(rows.len() - 1);
            }
        }
    }
    rows.iter().map(|r| row(r, positions, pad)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(len: usize, tag: u32) -> Encoded {
        Encoded {
            ids: vec![tag; len],
            targets: vec![tag; len],
        }
    }

    #[test]
    fn packing_fills_rows_and_marks_each_conversation() {
        let rows = pack_rows(
            vec![conv(5, 1), conv(3, 2), conv(8, 3), conv(2, 4), conv(6, 5)],
            10,
            0,
        );
        // 8+2, 6+3, 5: best fit, longest first.
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].inputs, [3, 3, 3, 3, 3, 3, 3, 3, 4, 4]);
        assert_eq!(
            rows[0].starts.as_deref(),
            Some(&[0, 0, 0, 0, 0, 0, 0, 0, 8, 8][..])
        );
        assert_eq!(rows[1].inputs, [5, 5, 5, 5, 5, 5, 2, 2, 2, 0]);
        assert_eq!(
            rows[1].starts.as_deref(),
            Some(&[0, 0, 0, 0, 0, 0, 6, 6, 6, 9][..])
        );
        assert_eq!(rows[1].targets[9], IGNORE);
        assert_eq!((rows[2].len, rows[2].starts.is_none()), (5, true));
    }

    /// SmolLM2-Instruct's template (ChatML with a default system turn) and Meta Llama 3's.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    /// The loss falls on exactly the assistant's tokens, with each template: the scored
    /// targets decode to the assistant turns' text with their end-of-turn marks, and the
    /// prompt the model is given at inference tokenizes to the ids before them.
    #[test]
    fn the_loss_falls_on_the_assistant_tokens_of_two_real_templates() {
        let docs = ["the whale sailed under the deep sea and the captain saw a storm"; 20];
        let inner = slm_tokenizer::train::train_bpe(
            docs.iter(),
            &slm_tokenizer::train::TrainOptions {
                vocab_size: 300,
                min_frequency: 2,
            },
        )
        .unwrap();
        let messages = [
            Message::new("user", "what did the whale see?"),
            Message::new("assistant", "a storm under the sea"),
            Message::new("user", "and the captain?"),
            Message::new("assistant", " the deep sea "),
        ];
        for (source, ends) in [
            (
                SMOLLM2,
                [
                    "a storm under the sea<|im_end|>",
                    " the deep sea <|im_end|>",
                ],
            ),
            (
                LLAMA3,
                ["a storm under the sea<|eot_id|>", "the deep sea<|eot_id|>"],
            ),
        ] {
            let mut tok = Tokenizer::new(inner.clone());
            let bos = Some("<|begin_of_text|>".to_string());
            tok.chat_template =
                Some(slm_tokenizer::ChatTemplate::new(source, bos, None, "t").unwrap());
            let e = encode(&tok, &messages).unwrap();
            let scored: Vec<u32> = e.targets.iter().copied().filter(|&t| t != IGNORE).collect();
            assert_eq!(tok.decode(&scored, false).unwrap(), ends.concat());
            // Scored runs are whole turns: the first scored target follows the prompt.
            let template = tok.chat_template.as_ref().unwrap();
            let prompt = template.render(&messages[..1], true).unwrap();
            let prompt_ids = tok.encode(&prompt, false).unwrap();
            let first = e.targets.iter().position(|&t| t != IGNORE).unwrap();
            assert_eq!(first + 1, prompt_ids.len());
            assert_eq!(e.ids[..prompt_ids.len()], prompt_ids[..]);
            assert_eq!(e.targets.last(), Some(&IGNORE));
        }
    }
}
