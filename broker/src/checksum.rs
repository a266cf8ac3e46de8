//! CRC-32C (Castagnoli), the checksum of every stored entry and of Kafka
//! record batches.
//!
//! Backed by `crc-fast`, which folds with carry-less multiplication
//! (VPCLMULQDQ where the CPU has it) and picks the instruction set at run
//! time. Reads verify every entry they return, so the checksum's speed is a
//! large share of a catch-up read: on the development machine it runs at
//! about twice the speed of the `crc32c` crate's `crc32` instruction loop for
//! a 1 MiB buffer.

/// The CRC-32C of `data`.
#[must_use]
pub fn crc32c(data: &[u8]) -> u32 {
    // CRC-32/ISCSI is CRC-32C; the 64-bit result holds a 32-bit value.
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32
}

#[cfg(test)]
mod tests {
    use super::crc32c;

    #[test]
    fn known_answers() {
        // The check value of CRC-32C (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    }
}
