//! Exact sums of PostgreSQL `numeric` values read in their binary form.
//!
//! The fold groups large statements itself (see `grouping`); summing each row's
//! `cost_estimate` through `numeric_add` or through text would cost more than the
//! whole rest of the row. A numeric's stored form is a sign, a weight and base
//! 10,000 digits; it is decoded here into an `i128` mantissa and a decimal scale,
//! and summed exactly. The sum keeps PostgreSQL's display scale rule for `sum()`
//! (the largest display scale of the inputs), so the result reads digit for digit
//! like `sum(cost_estimate)::text`. Anything that does not fit (NaN, infinities,
//! more than 38 significant digits) is reported, and the caller sums in SQL.

use bigdecimal::num_bigint::BigInt;
use bigdecimal::BigDecimal;

/// A finite numeric: `mantissa * 10^-scale`, with PostgreSQL's display scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    pub mantissa: i128,
    pub scale: u32,
    pub dscale: u16,
}

const SIGN_MASK: u16 = 0xC000;
const NEG: u16 = 0x4000;
const SHORT: u16 = 0x8000;
const SPECIAL: u16 = 0xC000;
const SHORT_SIGN_MASK: u16 = 0x2000;
const SHORT_DSCALE_MASK: u16 = 0x1F80;
const SHORT_DSCALE_SHIFT: u16 = 7;
const SHORT_WEIGHT_SIGN_MASK: u16 = 0x0040;
const SHORT_WEIGHT_MASK: u16 = 0x003F;
const DSCALE_MASK: u16 = 0x3FFF;

/// Decodes a numeric's bytes after the varlena header (`numeric.c`:
/// `NumericShort` or `NumericLong`, native byte order). None for NaN, the
/// infinities, a malformed value, or more digits than an i128 holds.
pub fn decode(payload: &[u8]) -> Option<Decoded> {
    let word = |i: usize| -> Option<u16> {
        let b = payload.get(i..i + 2)?;
        Some(u16::from_ne_bytes([b[0], b[1]]))
    };
    let header = word(0)?;
    let (negative, dscale, weight, digits_at) = match header & SIGN_MASK {
        SPECIAL => return None,
        SHORT => {
            let negative = header & SHORT_SIGN_MASK != 0;
            let dscale = (header & SHORT_DSCALE_MASK) >> SHORT_DSCALE_SHIFT;
            let mut weight = i32::from(header & SHORT_WEIGHT_MASK);
            if header & SHORT_WEIGHT_SIGN_MASK != 0 {
                weight |= !i32::from(SHORT_WEIGHT_MASK);
            }
            (negative, dscale, weight, 2)
        }
        sign => {
            let weight = i32::from(word(2)? as i16);
            (sign == NEG, header & DSCALE_MASK, weight, 4)
        }
    };
    let digits = &payload[digits_at..];
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    let ndigits = i32::try_from(digits.len() / 2).ok()?;
    let mut mantissa: i128 = 0;
    for pair in digits.chunks_exact(2) {
        let digit = u16::from_ne_bytes([pair[0], pair[1]]);
        if digit >= 10_000 {
            return None;
        }
        mantissa = mantissa
            .checked_mul(10_000)?
            .checked_add(i128::from(digit))?;
    }
    // The last digit stands for 10000^(weight - ndigits + 1).
    let exponent = weight - ndigits + 1;
    let scale = if exponent >= 0 {
        mantissa = mantissa.checked_mul(10i128.checked_pow(4 * exponent as u32)?)?;
        0
    } else {
        (-4 * exponent) as u32
    };
    if negative {
        mantissa = -mantissa;
    }
    Some(Decoded {
        mantissa,
        scale,
        dscale,
    })
}

/// An exact running sum of decoded numerics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sum {
    mantissa: i128,
    scale: u32,
    dscale: u16,
}

impl Sum {
    /// Adds a value; None when the sum would not fit (the caller falls back).
    #[must_use]
    pub fn add(&mut self, value: Decoded) -> Option<()> {
        let mut incoming = value.mantissa;
        if value.scale > self.scale {
            self.mantissa = self
                .mantissa
                .checked_mul(10i128.checked_pow(value.scale - self.scale)?)?;
            self.scale = value.scale;
        } else if value.scale < self.scale {
            incoming = incoming.checked_mul(10i128.checked_pow(self.scale - value.scale)?)?;
        }
        self.mantissa = self.mantissa.checked_add(incoming)?;
        self.dscale = self.dscale.max(value.dscale);
        Some(())
    }

    /// The sum at PostgreSQL's display scale (the inputs' largest). Digits past
    /// a value's display scale are always zero, so nothing is rounded away.
    pub fn to_bigdecimal(&self) -> BigDecimal {
        BigDecimal::new(BigInt::from(self.mantissa), i64::from(self.scale))
            .with_scale(i64::from(self.dscale))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short-format numeric as PostgreSQL stores it.
    fn short(negative: bool, dscale: u16, weight: i16, digits: &[u16]) -> Vec<u8> {
        let mut header = SHORT | (dscale << SHORT_DSCALE_SHIFT);
        if negative {
            header |= SHORT_SIGN_MASK;
        }
        header |= (weight as u16) & SHORT_WEIGHT_MASK;
        if weight < 0 {
            header |= SHORT_WEIGHT_SIGN_MASK;
        }
        let mut out = header.to_ne_bytes().to_vec();
        for d in digits {
            out.extend_from_slice(&d.to_ne_bytes());
        }
        out
    }

    fn long(negative: bool, dscale: u16, weight: i16, digits: &[u16]) -> Vec<u8> {
        let header = if negative { NEG } else { 0 } | dscale;
        let mut out = header.to_ne_bytes().to_vec();
        out.extend_from_slice(&weight.to_ne_bytes());
        for d in digits {
            out.extend_from_slice(&d.to_ne_bytes());
        }
        out
    }

    fn text(values: &[Vec<u8>]) -> String {
        let mut sum = Sum::default();
        for v in values {
            sum.add(decode(v).unwrap()).unwrap();
        }
        sum.to_bigdecimal().to_plain_string()
    }

    #[test]
    fn decodes_what_numeric_in_stores() {
        // 0.000002: weight -2, one digit 200 (0.0000|0200), dscale 6.
        assert_eq!(
            decode(&short(false, 6, -2, &[200])),
            Some(Decoded {
                mantissa: 200,
                scale: 8,
                dscale: 6
            })
        );
        // 12345.67: digits 1|2345|6700, weight 1, dscale 2.
        let d = decode(&short(false, 2, 1, &[1, 2345, 6700])).unwrap();
        assert_eq!((d.mantissa, d.scale), (1_2345_6700, 4));
        // 5.00: trailing zero digits are not stored, dscale keeps the scale.
        assert_eq!(text(&[short(false, 2, 0, &[5])]), "5.00");
        // 20000 (weight 1, one digit 2): scale 0.
        assert_eq!(text(&[short(false, 0, 1, &[2])]), "20000");
        // zero: no digits.
        assert_eq!(text(&[short(false, 0, 0, &[])]), "0");
        assert_eq!(text(&[short(true, 3, 0, &[7, 1230])]), "-7.123");
        assert_eq!(text(&[long(false, 2, 0, &[42, 5000])]), "42.50");
        assert_eq!(text(&[long(true, 0, 2, &[1, 0, 0])]), "-100000000");
    }

    #[test]
    fn sums_keep_the_largest_display_scale() {
        // 0.000002 + 0.10 + 3 = 3.100002
        assert_eq!(
            text(&[
                short(false, 6, -2, &[200]),
                short(false, 2, -1, &[1000]),
                short(false, 0, 0, &[3]),
            ]),
            "3.100002"
        );
        // 0.50 + 0.50 = 1.00 (not 1)
        assert_eq!(
            text(&[short(false, 2, -1, &[5000]), short(false, 2, -1, &[5000])]),
            "1.00"
        );
        assert_eq!(Sum::default().to_bigdecimal().to_plain_string(), "0");
    }

    #[test]
    fn refuses_what_it_cannot_sum_exactly() {
        assert_eq!(decode(&SPECIAL.to_ne_bytes()), None); // NaN
        assert_eq!(decode(&(SPECIAL | 0x1000).to_ne_bytes()), None); // +Infinity
        assert_eq!(decode(&[0x80]), None); // truncated
        assert_eq!(decode(&short(false, 0, 0, &[10_000])), None); // not a base-10000 digit
                                                                  // 40 nines do not fit an i128 mantissa.
        assert_eq!(decode(&long(false, 0, 9, &[9999; 10])), None);
        let mut sum = Sum::default();
        let big = decode(&long(false, 0, 8, &[9999; 9])).unwrap(); // 36 nines
        for _ in 0..99 {
            sum.add(big).unwrap();
        }
        assert_eq!(sum.add(decode(&short(false, 30, -8, &[1])).unwrap()), None);
    }
}
