//! A developer hook that sees the model's intermediate tensors by llama.cpp's names
//! (`attn_norm-3`, `kqv_out-3`, `l_out-3`, ...), to find where two implementations part.
//! Unset, a tap costs one thread-local check per layer.

use candle_core::Tensor;
use std::cell::RefCell;

type Tap = Box<dyn FnMut(&str, &Tensor)>;

thread_local! {
    static TAP: RefCell<Option<Tap>> = const { RefCell::new(None) };
}

/// Installs (or with None removes) the hook for forward passes on this thread.
pub fn set(tap: Option<Tap>) {
    TAP.with(|t| *t.borrow_mut() = tap);
}

/// Whether a hook is installed (to skip building a tensor only a tap would see).
pub(crate) fn active() -> bool {
    TAP.with(|t| t.borrow().is_some())
}

pub(crate) fn see(name: &str, layer: Option<usize>, x: &Tensor) {
    TAP.with(|t| {
        if let Some(f) = t.borrow_mut().as_mut() {
            match layer {
                Some(l) => f(&format!("{name}-{l}"), x),
                None => f(name, x),
            }
        }
    });
}
