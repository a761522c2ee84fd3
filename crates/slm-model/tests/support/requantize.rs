//! The fixtures' other storage types of SmolLM2, made from the Q4_1 asset as the fixtures
//! were (`llama-quantize --allow-requantize Q4_1.gguf OUT TYPE`): every tensor of two
//! dimensions dequantized to f32 and stored as the new type, 1-D tensors (the norms) left in
//! F32, metadata copied. candle's quantizers are ggml's reference ones for these types (Q8_0:
//! `d = amax / 127`, values `roundf(x / d)`; F16: round to nearest even).

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use slm_model::gguf::Value;

fn candle_value(v: &Value) -> gguf_file::Value {
    use gguf_file::Value as V;
    match v {
        Value::U8(x) => V::U8(*x),
        Value::I8(x) => V::I8(*x),
        Value::U16(x) => V::U16(*x),
        Value::I16(x) => V::I16(*x),
        Value::U32(x) => V::U32(*x),
        Value::I32(x) => V::I32(*x),
        Value::U64(x) => V::U64(*x),
        Value::I64(x) => V::I64(*x),
        Value::F32(x) => V::F32(*x),
        Value::F64(x) => V::F64(*x),
        Value::Bool(x) => V::Bool(*x),
        Value::String(x) => V::String(x.clone()),
        Value::Array(x) => V::Array(x.iter().map(candle_value).collect()),
    }
}

/// Writes `src`'s model with its matrices stored as `ty` to `dst`.
pub fn requantize(src: &Path, dst: &Path, ty: GgmlDType) {
    let dev = Device::Cpu;
    let file = slm_model::GgufFile::open(src).unwrap();
    let meta: Vec<(&str, gguf_file::Value)> = file
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), candle_value(v)))
        .collect();
    let tensors: Vec<(&str, QTensor)> = file
        .tensors
        .iter()
        .map(|t| {
            let q = slm_model::weights::gguf_qtensor(&file, &t.name, &dev).unwrap();
            let q = if t.dims.len() == 2 {
                QTensor::quantize(&q.dequantize(&dev).unwrap(), ty).unwrap()
            } else {
                q
            };
            (t.name.as_str(), q)
        })
        .collect();
    let meta_refs: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (*n, q)).collect();
    let mut f = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}
