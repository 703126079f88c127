//! Exact 128-bit sums as PostgreSQL `NUMERIC`, in its binary format, so they travel in
//! arrays and `COPY … BINARY` without a detour through text.

use std::error::Error;

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{IsNull, ToSql, Type, accepts, to_sql_checked};

/// An integer sent as `NUMERIC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Numeric(pub i128);

/// `numeric_send`'s sign word of a negative number.
const NEGATIVE: u16 = 0x4000;

impl ToSql for Numeric {
    /// `ndigits, weight, sign, dscale` (16 bits each), then base-10000 digits, most
    /// significant first, trailing zero digits left out (as PostgreSQL writes them).
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        let mut magnitude = self.0.unsigned_abs();
        let mut digits = Vec::with_capacity(10);
        while magnitude > 0 {
            digits.push((magnitude % 10_000) as u16);
            magnitude /= 10_000;
        }
        let weight = digits.len().saturating_sub(1) as u16;
        let trailing_zeros = digits.iter().take_while(|&&digit| digit == 0).count();
        let significant = &digits[trailing_zeros..];
        out.put_u16(significant.len() as u16);
        out.put_u16(weight);
        out.put_u16(if self.0 < 0 { NEGATIVE } else { 0 });
        out.put_u16(0);
        for &digit in significant.iter().rev() {
            out.put_u16(digit);
        }
        Ok(IsNull::No)
    }

    accepts!(NUMERIC);
    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(value: i128) -> Vec<u8> {
        let mut out = BytesMut::new();
        Numeric(value).to_sql(&Type::NUMERIC, &mut out).unwrap();
        out.to_vec()
    }

    #[test]
    fn integers_encode_like_numeric_send() {
        assert_eq!(encode(0), [0, 0, 0, 0, 0, 0, 0, 0]);
        // 12345678 = 1234 | 5678: two digits, weight 1.
        assert_eq!(encode(12_345_678), [0, 2, 0, 1, 0, 0, 0, 0, 0x04, 0xd2, 0x16, 0x2e]);
        // -10000 = 1 | 0000: the zero digit is left out, weight stays 1.
        assert_eq!(encode(-10_000), [0, 1, 0, 1, 0x40, 0, 0, 0, 0, 1]);
    }
}
