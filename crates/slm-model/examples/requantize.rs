//! Writes a GGUF's model with its matrices stored as another type, the way the reference
//! fixtures' Q8_0 and F16 files were made from the Q4_1 asset (see tests/support): for the
//! benchmarks, until `slm quantize` exists.
//!
//!     cargo run --release -p slm-model --example requantize -- IN.gguf OUT.gguf q8_0|f16

#[path = "../tests/support/requantize.rs"]
mod requantize;

use candle_core::quantized::GgmlDType;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [src, dst, ty] = args.as_slice() else {
        eprintln!("usage: requantize IN.gguf OUT.gguf q8_0|f16");
        std::process::exit(2);
    };
    let ty = match ty.as_str() {
        "q8_0" => GgmlDType::Q8_0,
        "f16" => GgmlDType::F16,
        other => {
            eprintln!("type {other:?}: expected q8_0 or f16");
            std::process::exit(2);
        }
    };
    requantize::requantize(src.as_ref(), dst.as_ref(), ty);
}
