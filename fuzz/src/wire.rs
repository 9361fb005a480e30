//! The byte format of fuzz inputs.
//!
//! Decoding reads fixed-size little-endian integers from the front of the input through
//! [`arbitrary::Unstructured`]; when the input runs out every further field reads as zero, so
//! any byte string decodes (to a shorter, simpler input). A choice among `n` alternatives is one
//! byte taken modulo `n`; a list is a count byte (modulo its bound) followed by its items.
//! [`Writer`] writes the same layout, so seeds can be built as values and encoded; the tests
//! check that `decode(encode(x)) == x`.

use arbitrary::Unstructured;

/// Reads fields from fuzz bytes.
pub struct Reader<'a>(Unstructured<'a>);

impl<'a> Reader<'a> {
    /// Read from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Reader(Unstructured::new(data))
    }

    /// One byte (zero once the input is exhausted).
    pub fn u8(&mut self) -> u8 {
        self.0.arbitrary().unwrap_or(0)
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        self.0.arbitrary().unwrap_or(0)
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        self.0.arbitrary().unwrap_or(0)
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        self.0.arbitrary().unwrap_or(0)
    }

    /// One of `n` alternatives (`n >= 1`).
    pub fn pick(&mut self, n: u8) -> u8 {
        self.u8() % n
    }

    /// A flag (the low bit of a byte).
    pub fn flag(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// A list of at most `max` items.
    pub fn list<T>(&mut self, max: u8, mut item: impl FnMut(&mut Self) -> T) -> Vec<T> {
        let n = self.u8() % (max + 1);
        (0..n).map(|_| item(self)).collect()
    }

    /// Whether every byte has been consumed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Writes fields in the layout [`Reader`] reads.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// A byte.
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    /// A little-endian u16.
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// A flag.
    pub fn flag(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    /// A list: its length, then each item.
    pub fn list<T>(&mut self, items: &[T], mut item: impl FnMut(&mut Self, &T)) {
        self.u8(u8::try_from(items.len()).expect("list of at most 255 items"));
        for i in items {
            item(self, i);
        }
    }
}

/// A value with a fuzz encoding.
pub trait Wire: Sized {
    /// Read a value.
    fn decode(r: &mut Reader<'_>) -> Self;
    /// Write the value so that [`Wire::decode`] reads it back.
    fn encode(&self, w: &mut Writer);

    /// Decode a whole input.
    fn from_bytes(data: &[u8]) -> Self {
        Self::decode(&mut Reader::new(data))
    }

    /// Encode to bytes.
    fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::default();
        self.encode(&mut w);
        w.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_little_endian_and_missing_bytes_read_as_zero() {
        let mut w = Writer::default();
        w.u8(7);
        w.u16(0x1234);
        w.u32(0xdead_beef);
        w.u64(u64::MAX - 1);
        let mut r = Reader::new(&w.0);
        assert_eq!(r.u8(), 7);
        assert_eq!(r.u16(), 0x1234);
        assert_eq!(r.u32(), 0xdead_beef);
        assert_eq!(r.u64(), u64::MAX - 1);
        assert!(r.is_empty());
        assert_eq!(r.u32(), 0);
        let mut r = Reader::new(&[1]);
        assert_eq!(r.u16(), 1, "a short integer is zero-padded");
    }
}
