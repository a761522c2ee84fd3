//! Growable scratch buffers in anonymous mappings of their own, outside the heap.
//!
//! Why: a prompt's matmuls need megabytes of quantized activations each. Allocated per call,
//! or kept in a heap `Vec` between calls, they sat between the heap's other large blocks,
//! which glibc is told to keep (slm-cli's `keep_freed_memory`, for training), and the heap
//! grew around them: 0.9 MB of pairs of a 512-token prompt raised the peak RSS by 5 MB. A
//! mapping of its own costs only the pages it touches and leaves the heap's holes whole.

/// Values that every bit pattern makes valid (plain numbers and arrays and structs of them),
/// so a buffer's old contents may be handed out again.
///
/// # Safety
/// The type has no padding-sensitive invariants, no references, and any bits are a value.
pub(crate) unsafe trait Plain: Copy {}
unsafe impl Plain for f32 {}

/// The system refused memory for a scratch buffer.
#[derive(Debug, thiserror::Error)]
#[error("cannot map {bytes} bytes of scratch memory for a matmul's activations: {source}")]
pub struct MapError {
    pub bytes: usize,
    pub source: std::io::Error,
}

/// One growable buffer; `slice` hands out its first `len` values (old contents: every
/// caller writes what it reads).
#[derive(Default)]
pub(crate) struct Scratch {
    map: Option<memmap2::MmapMut>,
}

impl Scratch {
    pub(crate) fn slice<T: Plain>(&mut self, len: usize) -> Result<&mut [T], MapError> {
        let too_big = |bytes| MapError {
            bytes,
            source: std::io::Error::new(std::io::ErrorKind::OutOfMemory, "size overflows"),
        };
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| too_big(usize::MAX))?;
        if bytes == 0 {
            return Ok(&mut []);
        }
        if self.map.as_ref().is_none_or(|m| m.len() < bytes) {
            // Grown in powers of two: a few remappings over a model's run, not one per size.
            let size = bytes
                .checked_next_power_of_two()
                .ok_or_else(|| too_big(bytes))?;
            self.map = None;
            self.map = Some(memmap2::MmapMut::map_anon(size).map_err(|source| MapError {
                bytes: size,
                source,
            })?);
        }
        let map = self.map.as_mut().expect("mapped above");
        debug_assert!(map.as_ptr().align_offset(std::mem::align_of::<T>()) == 0);
        // SAFETY: the mapping is page-aligned (so aligned for T), holds `bytes`, and is
        // borrowed mutably for the slice's life; any bits are a T (`Plain`).
        Ok(unsafe { std::slice::from_raw_parts_mut(map.as_mut_ptr().cast::<T>(), len) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer grows when asked for more, keeps what was written while it fits, and hands
    /// out exactly the length asked for.
    #[test]
    fn grows_and_reuses() {
        let mut s = Scratch::default();
        assert!(s.slice::<f32>(0).unwrap().is_empty());
        let a = s.slice::<f32>(3).unwrap();
        a.copy_from_slice(&[1.0, 2.0, 3.0]);
        assert_eq!(s.slice::<f32>(2).unwrap(), &[1.0, 2.0]);
        let big = s.slice::<f32>(5000).unwrap();
        assert_eq!(big.len(), 5000);
        big.fill(7.0);
        assert!(s.slice::<f32>(5000).unwrap().iter().all(|&v| v == 7.0));
    }

    /// Memory the system will not give is an error that says how much, not a panic.
    #[test]
    fn a_mapping_the_system_refuses_is_an_error() {
        let mut s = Scratch::default();
        let e = s.slice::<f32>(1 << 60).unwrap_err().to_string();
        assert!(
            e.contains("cannot map") && e.contains("bytes of scratch memory"),
            "{e}"
        );
        let e = s.slice::<f32>(usize::MAX).unwrap_err().to_string();
        assert!(e.contains("size overflows"), "{e}");
        // The buffer still works afterwards.
        assert_eq!(s.slice::<f32>(4).unwrap().len(), 4);
    }
}
