//! The repacked layout of the 32-block weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) for the x86 kernels: rows in groups of
//! eight, block by block, so that one load brings the scales of eight rows (and their offsets,
//! summed for all eight in one vector instruction), and the nibbles of two consecutive blocks
//! share a byte (one 32-byte load and a mask gives a whole block of values, where ggml's
//! layout needs a 16-byte load, a shift, an insert and a mask).
//!
//! Per group of eight rows, the blocks come in units of `per_unit` blocks (two for the 4-bit
//! types, one for Q8_0); a unit holds the eight rows' f16 scales for each of its blocks, then
//! their f16 offsets (Q4_1, Q5_1), then the eight rows' 32 fifth bits of each block (Q5_0,
//! Q5_1), then 32 bytes per row: for 4- and 5-bit types byte i carries (the low four bits of)
//! value i of the unit's first block in its low nibble and of its second block in its high
//! nibble. The
//! bytes per group equal eight GGUF rows', except for padding: the last group of a matrix whose
//! row count is not a multiple of eight, and an unpaired last block, are zero-filled.
//! `unpack` restores the GGUF bytes exactly, so they remain the source of truth.

use super::{BlockType, QK};

pub const ROWS: usize = 8;

/// Where things are in a unit of one group.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub per_unit: usize,
    pub unit_bytes: usize,
    pub d_off: usize,
    pub m_off: usize,
    /// The fifth bits (Q5_0, Q5_1): block h of row r at `h_off + (h * ROWS + r) * 4`.
    pub h_off: usize,
    pub qs_off: usize,
}

pub fn geometry(t: BlockType) -> Option<Geometry> {
    let g = |per_unit, with_m: bool, fifth: bool| {
        let scales = per_unit * ROWS * 2;
        let h_off = if with_m { 2 * scales } else { scales };
        let qs_off = h_off + if fifth { per_unit * ROWS * 4 } else { 0 };
        Geometry {
            per_unit,
            unit_bytes: qs_off + ROWS * 32,
            d_off: 0,
            m_off: scales,
            h_off,
            qs_off,
        }
    };
    Some(match t {
        BlockType::Q4_0 => g(2, false, false),
        BlockType::Q4_1 => g(2, true, false),
        BlockType::Q5_0 => g(2, false, true),
        BlockType::Q5_1 => g(2, true, true),
        BlockType::Q8_0 => g(1, false, false),
    })
}

/// Where a GGUF block of `t` keeps its offset, its fifth bits and its packed values.
fn block_fields(t: BlockType) -> (Option<usize>, Option<usize>, usize) {
    match t {
        BlockType::Q4_0 => (None, None, 2),
        BlockType::Q4_1 => (Some(2), None, 4),
        BlockType::Q5_0 => (None, Some(2), 6),
        BlockType::Q5_1 => (Some(2), Some(4), 8),
        BlockType::Q8_0 => (None, None, 2),
    }
}

impl Geometry {
    pub fn units(&self, nb: usize) -> usize {
        nb.div_ceil(self.per_unit)
    }
    pub fn group_bytes(&self, nb: usize) -> usize {
        self.units(nb) * self.unit_bytes
    }
}

/// Byte offset of value i's nibble/byte within a GGUF block, and whether it is the high nibble.
fn nibble_at(i: usize) -> (usize, bool) {
    if i < 16 {
        (i, false)
    } else {
        (i - 16, true)
    }
}

/// GGUF rows (n of k values, `t`'s blocks) to the grouped layout.
pub fn pack(t: BlockType, gguf: &[u8], n: usize, k: usize) -> Vec<u8> {
    let geo = geometry(t).expect("pack: a type with a grouped layout");
    let (nb, bb) = (k / QK, t.block_bytes());
    let gb = geo.group_bytes(nb);
    let mut out = vec![0u8; n.div_ceil(ROWS) * gb];
    for row in 0..n {
        let (g, r) = (row / ROWS, row % ROWS);
        for b in 0..nb {
            let blk = &gguf[(row * nb + b) * bb..][..bb];
            let (u, h) = (b / geo.per_unit, b % geo.per_unit);
            let unit = &mut out[g * gb + u * geo.unit_bytes..][..geo.unit_bytes];
            let s = (h * ROWS + r) * 2;
            unit[geo.d_off + s..][..2].copy_from_slice(&blk[..2]);
            let (m_at, h_at, data_at) = block_fields(t);
            if let Some(at) = m_at {
                unit[geo.m_off + s..][..2].copy_from_slice(&blk[at..at + 2]);
            }
            if let Some(at) = h_at {
                unit[geo.h_off + s * 2..][..4].copy_from_slice(&blk[at..at + 4]);
            }
            let qs = &mut unit[geo.qs_off + r * 32..][..32];
            if t == BlockType::Q8_0 {
                qs.copy_from_slice(&blk[2..34]);
                continue;
            }
            let data = &blk[data_at..data_at + 16];
            for (i, q) in qs.iter_mut().enumerate() {
                let (j, high) = nibble_at(i);
                let v = if high { data[j] >> 4 } else { data[j] & 0x0F };
                *q |= v << (4 * h);
            }
        }
    }
    out
}

/// The grouped layout back to GGUF rows, byte for byte.
pub fn unpack(t: BlockType, packed: &[u8], n: usize, k: usize) -> Vec<u8> {
    let row_bytes = k / QK * t.block_bytes();
    let mut out = vec![0u8; n * row_bytes];
    for (row, dst) in out.chunks_exact_mut(row_bytes).enumerate() {
        unpack_row(t, packed, row, k, dst);
    }
    out
}

/// Row `row` of a grouped matrix back to its GGUF bytes, into `out` (one row's bytes, zeroed).
pub fn unpack_row(t: BlockType, packed: &[u8], row: usize, k: usize, out: &mut [u8]) {
    let geo = geometry(t).expect("unpack: a type with a grouped layout");
    let gb = geo.group_bytes(k / QK);
    let (g, r) = (row / ROWS, row % ROWS);
    let bb = t.block_bytes();
    for (b, blk) in out.chunks_exact_mut(bb).enumerate() {
        let (u, h) = (b / geo.per_unit, b % geo.per_unit);
        let unit = &packed[g * gb + u * geo.unit_bytes..][..geo.unit_bytes];
        let s = (h * ROWS + r) * 2;
        blk[..2].copy_from_slice(&unit[geo.d_off + s..][..2]);
        let (m_at, h_at, data_at) = block_fields(t);
        if let Some(at) = m_at {
            blk[at..at + 2].copy_from_slice(&unit[geo.m_off + s..][..2]);
        }
        if let Some(at) = h_at {
            blk[at..at + 4].copy_from_slice(&unit[geo.h_off + s * 2..][..4]);
        }
        let qs = &unit[geo.qs_off + r * 32..][..32];
        if t == BlockType::Q8_0 {
            blk[2..34].copy_from_slice(qs);
            continue;
        }
        let data = &mut blk[data_at..data_at + 16];
        for (i, &q) in qs.iter().enumerate() {
            let v = (q >> (4 * h)) & 0x0F;
            let (j, high) = nibble_at(i);
            data[j] |= if high { v << 4 } else { v };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_inverts_pack() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for t in [
            BlockType::Q4_0,
            BlockType::Q4_1,
            BlockType::Q5_0,
            BlockType::Q5_1,
            BlockType::Q8_0,
        ] {
            for (n, k) in [(1, 32), (8, 64), (13, 96), (17, 576)] {
                let bytes: Vec<u8> = (0..n * k / QK * t.block_bytes())
                    .map(|_| rng.random())
                    .collect();
                let p = pack(t, &bytes, n, k);
                assert_eq!(
                    p.len(),
                    n.div_ceil(ROWS) * geometry(t).unwrap().group_bytes(k / QK)
                );
                assert_eq!(unpack(t, &p, n, k), bytes, "{t:?} {n}x{k}");
            }
        }
    }
}
