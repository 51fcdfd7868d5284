//! Withdrawal destinations: which address formats each asset accepts, with
//! their checksums, so that what an approver reads is what gets paid.
//!
//! An address is refused unless it is plain ASCII in its format's alphabet
//! (never a control, bidi or invisible character: `bc1q\u{202e}lacol-kcatta`
//! shows as `bc1qattack-local`) and, where the format has a checksum, the
//! checksum holds — a typo is refused here instead of losing the funds:
//!
//! | asset | accepted |
//! |---|---|
//! | `BTC` | segwit addresses (BIP 173 bech32 for version 0, BIP 350 bech32m for 1–16) on `bc` (mainnet), `tb` (testnet) or `bcrt` (regtest); legacy base58check P2PKH/P2SH (`1…`, `3…`, testnet `m…`, `n…`, `2…`) |
//! | `ETH`, `USDT` (ERC-20) | `0x` and 40 hexadecimal digits; in mixed case the EIP-55 checksum must hold (all lower or all upper case carries none) |
//! | `USD`, `EUR` | an IBAN (ISO 13616: country, check digits, mod-97), spaces allowed between groups |
//! | any other asset | 1–128 characters of `A–Z a–z 0–9 - _ . :` |
//!
//! The checksum arithmetic is written here from the BIPs', EIP-55's, the
//! Keccak reference's and ISO's definitions; it is small and has no
//! dependency but `sha2`.
use crate::error::{Error, Result};
use sha2::{Digest, Sha256};

/// The bech32 alphabet (BIP 173): value `i` is written as `CHARSET[i]`.
const CHARSET: &[u8; 32] = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";
/// The checksum constants of bech32 (BIP 173) and bech32m (BIP 350).
const BECH32: u32 = 1;
const BECH32M: u32 = 0x2bc8_30a3;
/// The human-readable parts of the Bitcoin networks accepted.
const BTC_HRPS: &[&str] = &["bc", "tb", "bcrt"];
/// The base58 alphabet (no 0, O, I, l).
const BASE58: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
/// Base58check version bytes of P2PKH/P2SH on mainnet and testnet.
const BTC_BASE58_VERSIONS: &[u8] = &[0x00, 0x05, 0x6f, 0xc4];

/// Checks `address` as a destination for `asset` (see the module docs).
/// The error names the rule, never echoes the address.
pub fn check(asset: &str, address: &str) -> Result<()> {
    let refuse = |why: &str| Err(Error::Invalid(format!("address: {why}")));
    if address.is_empty() || address.len() > 128 {
        return refuse("1 to 128 characters");
    }
    if !address.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return refuse("only visible ASCII characters");
    }
    match asset {
        "BTC" => {
            let lower = address.to_ascii_lowercase();
            if BTC_HRPS
                .iter()
                .any(|hrp| lower.starts_with(&format!("{hrp}1")))
            {
                segwit(address)
                    .map(|_| ())
                    .ok_or(())
                    .or_else(|()| refuse("not a valid bech32/bech32m Bitcoin address"))
            } else if base58check(address)
                .is_some_and(|p| p.len() == 21 && BTC_BASE58_VERSIONS.contains(&p[0]))
            {
                Ok(())
            } else {
                refuse("not a valid Bitcoin address")
            }
        }
        "ETH" | "USDT" => {
            let hex = address.strip_prefix("0x").unwrap_or("");
            if hex.len() != 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                refuse("0x and 40 hexadecimal digits")
            } else if !eip55(hex) {
                refuse("the mixed-case (EIP-55) checksum does not match")
            } else {
                Ok(())
            }
        }
        "USD" | "EUR" => {
            if iban(address) {
                Ok(())
            } else {
                refuse("not a valid IBAN")
            }
        }
        _ => {
            if address
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
            {
                Ok(())
            } else {
                refuse("letters, digits, '-', '_', '.' and ':' only")
            }
        }
    }
}

fn polymod(values: impl IntoIterator<Item = u8>) -> u32 {
    const GEN: [u32; 5] = [
        0x3b6a_57b2,
        0x2650_8e6d,
        0x1ea1_19fa,
        0x3d42_33dd,
        0x2a14_62b3,
    ];
    let mut chk: u32 = 1;
    for v in values {
        let top = chk >> 25;
        chk = ((chk & 0x01ff_ffff) << 5) ^ u32::from(v);
        for (i, g) in GEN.iter().enumerate() {
            if (top >> i) & 1 == 1 {
                chk ^= g;
            }
        }
    }
    chk
}

/// The HRP expanded for the checksum: high bits, a zero, low bits.
fn hrp_expand(hrp: &str) -> Vec<u8> {
    let b = hrp.as_bytes();
    b.iter()
        .map(|c| c >> 5)
        .chain(std::iter::once(0))
        .chain(b.iter().map(|c| c & 31))
        .collect()
}

/// A segwit address's (witness version, program), if its encoding,
/// checksum variant and program length are valid.
fn segwit(address: &str) -> Option<(u8, Vec<u8>)> {
    if address.len() > 90 {
        return None;
    }
    let has_lower = address.bytes().any(|b| b.is_ascii_lowercase());
    let has_upper = address.bytes().any(|b| b.is_ascii_uppercase());
    if has_lower && has_upper {
        return None;
    }
    let lower = address.to_ascii_lowercase();
    let sep = lower.rfind('1')?;
    let (hrp, data) = (&lower[..sep], &lower[sep + 1..]);
    if !BTC_HRPS.contains(&hrp) || data.len() < 7 {
        return None;
    }
    let values: Vec<u8> = data
        .bytes()
        .map(|c| {
            CHARSET
                .iter()
                .position(|&x| x == c)
                .and_then(|p| u8::try_from(p).ok())
        })
        .collect::<Option<_>>()?;
    let constant = polymod(hrp_expand(hrp).into_iter().chain(values.iter().copied()));
    let version = *values.first()?;
    let expected = match version {
        0 => BECH32,
        1..=16 => BECH32M,
        _ => return None,
    };
    if constant != expected {
        return None;
    }
    let program = regroup(&values[1..values.len() - 6])?;
    let fits = match version {
        0 => program.len() == 20 || program.len() == 32,
        _ => (2..=40).contains(&program.len()),
    };
    fits.then_some((version, program))
}

/// 5-bit groups to bytes; the padding must be under 5 bits and zero.
fn regroup(values: &[u8]) -> Option<Vec<u8>> {
    let (mut acc, mut bits) = (0u32, 0u32);
    let mut out = Vec::with_capacity(values.len() * 5 / 8);
    for &v in values {
        acc = (acc << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    if bits >= 5 || (acc & ((1 << bits) - 1)) != 0 {
        return None;
    }
    Some(out)
}

/// The payload of a base58check string (version byte first), if the
/// alphabet and the 4-byte double-SHA-256 checksum are right.
fn base58check(text: &str) -> Option<Vec<u8>> {
    if text.is_empty() || text.len() > 64 {
        return None;
    }
    // Big-endian base-256 digits of the number, built digit by digit.
    let mut bytes: Vec<u8> = Vec::new();
    for c in text.bytes() {
        let mut carry = u32::try_from(BASE58.iter().position(|&x| x == c)?).ok()?;
        for b in bytes.iter_mut().rev() {
            carry += u32::from(*b) * 58;
            *b = u8::try_from(carry & 0xff).ok()?;
            carry >>= 8;
        }
        while carry > 0 {
            bytes.insert(0, u8::try_from(carry & 0xff).ok()?);
            carry >>= 8;
        }
    }
    let zeros = text.bytes().take_while(|&c| c == b'1').count();
    let mut full = vec![0u8; zeros];
    full.extend(bytes);
    if full.len() < 5 {
        return None;
    }
    let (payload, checksum) = full.split_at(full.len() - 4);
    let digest = Sha256::digest(Sha256::digest(payload));
    (digest[..4] == *checksum).then(|| payload.to_vec())
}

/// Whether 40 hex digits pass EIP-55: all lower or all upper case (no
/// checksum), or each letter upper case exactly when the matching nibble
/// of Keccak-256(lower-case hex) is 8 or more.
fn eip55(hex: &str) -> bool {
    let has_lower = hex.bytes().any(|b| b.is_ascii_lowercase());
    let has_upper = hex.bytes().any(|b| b.is_ascii_uppercase());
    if !(has_lower && has_upper) {
        return true;
    }
    let lower = hex.to_ascii_lowercase();
    let hash = keccak256(lower.as_bytes());
    hex.bytes().enumerate().all(|(i, c)| {
        let nibble = (hash[i / 2] >> (if i % 2 == 0 { 4 } else { 0 })) & 0x0f;
        !c.is_ascii_alphabetic() || c.is_ascii_uppercase() == (nibble >= 8)
    })
}

/// Keccak-256 as Ethereum uses it (the original padding, not SHA3-256's).
fn keccak256(data: &[u8]) -> [u8; 32] {
    const RATE: usize = 136;
    let mut state = [0u64; 25];
    let mut padded = data.to_vec();
    padded.push(0x01);
    while !padded.len().is_multiple_of(RATE) {
        padded.push(0);
    }
    if let Some(last) = padded.last_mut() {
        *last |= 0x80;
    }
    for block in padded.chunks(RATE) {
        for (lane, bytes) in state.iter_mut().zip(block.chunks(8)) {
            let mut le = [0u8; 8];
            le.copy_from_slice(bytes);
            *lane ^= u64::from_le_bytes(le);
        }
        keccak_f(&mut state);
    }
    let mut out = [0u8; 32];
    for (chunk, lane) in out.chunks_mut(8).zip(state.iter()) {
        chunk.copy_from_slice(&lane.to_le_bytes());
    }
    out
}

/// The Keccak-f[1600] permutation; lane (x, y) is `a[x + 5 * y]`.
fn keccak_f(a: &mut [u64; 25]) {
    const RC: [u64; 24] = [
        0x0000_0000_0000_0001,
        0x0000_0000_0000_8082,
        0x8000_0000_0000_808A,
        0x8000_0000_8000_8000,
        0x0000_0000_0000_808B,
        0x0000_0000_8000_0001,
        0x8000_0000_8000_8081,
        0x8000_0000_0000_8009,
        0x0000_0000_0000_008A,
        0x0000_0000_0000_0088,
        0x0000_0000_8000_8009,
        0x0000_0000_8000_000A,
        0x0000_0000_8000_808B,
        0x8000_0000_0000_008B,
        0x8000_0000_0000_8089,
        0x8000_0000_0000_8003,
        0x8000_0000_0000_8002,
        0x8000_0000_0000_0080,
        0x0000_0000_0000_800A,
        0x8000_0000_8000_000A,
        0x8000_0000_8000_8081,
        0x8000_0000_0000_8080,
        0x0000_0000_8000_0001,
        0x8000_0000_8000_8008,
    ];
    // Rotation of lane (x, y), as ROT[x][y].
    const ROT: [[u32; 5]; 5] = [
        [0, 36, 3, 41, 18],
        [1, 44, 10, 45, 2],
        [62, 6, 43, 15, 61],
        [28, 55, 25, 21, 56],
        [27, 20, 39, 8, 14],
    ];
    for rc in RC {
        let mut c = [0u64; 5];
        for (x, cx) in c.iter_mut().enumerate() {
            *cx = a[x] ^ a[x + 5] ^ a[x + 10] ^ a[x + 15] ^ a[x + 20];
        }
        for x in 0..5 {
            let d = c[(x + 4) % 5] ^ c[(x + 1) % 5].rotate_left(1);
            for y in 0..5 {
                a[x + 5 * y] ^= d;
            }
        }
        let mut b = [0u64; 25];
        for x in 0..5 {
            for y in 0..5 {
                b[y + 5 * ((2 * x + 3 * y) % 5)] = a[x + 5 * y].rotate_left(ROT[x][y]);
            }
        }
        for x in 0..5 {
            for y in 0..5 {
                a[x + 5 * y] = b[x + 5 * y] ^ (!b[(x + 1) % 5 + 5 * y] & b[(x + 2) % 5 + 5 * y]);
            }
        }
        a[0] ^= rc;
    }
}

/// Whether `text` is an IBAN: two letters, two check digits, 11–30
/// alphanumerics, and the ISO 7064 mod-97 remainder 1.
fn iban(text: &str) -> bool {
    let compact: String = text.chars().filter(|&c| c != ' ').collect();
    let b = compact.as_bytes();
    if !(15..=34).contains(&b.len())
        || !b[..2].iter().all(u8::is_ascii_uppercase)
        || !b[2..4].iter().all(u8::is_ascii_digit)
        || !b[4..]
            .iter()
            .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
    {
        return false;
    }
    let mut rem: u32 = 0;
    for &c in b[4..].iter().chain(&b[..4]) {
        let v = if c.is_ascii_digit() {
            u32::from(c - b'0')
        } else {
            u32::from(c - b'A') + 10
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bech32 encoding of a segwit program, to build test addresses.
    fn encode(hrp: &str, version: u8, program: &[u8]) -> String {
        let mut values = vec![version];
        let (mut acc, mut bits) = (0u32, 0u32);
        for &b in program {
            acc = (acc << 8) | u32::from(b);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                values.push(((acc >> bits) & 31) as u8);
            }
        }
        if bits > 0 {
            values.push(((acc << (5 - bits)) & 31) as u8);
        }
        let constant = if version == 0 { BECH32 } else { BECH32M };
        let check = polymod(
            hrp_expand(hrp)
                .into_iter()
                .chain(values.iter().copied())
                .chain([0; 6]),
        ) ^ constant;
        values.extend((0..6).map(|i| ((check >> (5 * (5 - i))) & 31) as u8));
        let data: String = values
            .iter()
            .map(|&v| CHARSET[v as usize] as char)
            .collect();
        format!("{hrp}1{data}")
    }

    #[test]
    fn bitcoin_addresses() {
        // BIP 173 and BIP 350 example addresses.
        for ok in [
            "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",
            "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4",
            "tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7",
            "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0",
            "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2",
            "3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy",
        ] {
            assert!(check("BTC", ok).is_ok(), "{ok}");
        }
        let ours = encode("bc", 0, &[7; 20]);
        assert!(check("BTC", &ours).is_ok(), "{ours}");
        for bad in [
            // One character changed: the checksum fails.
            "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t5",
            // Mixed case.
            "bc1qW508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",
            // Version 1 with the bech32 (not bech32m) checksum.
            &encode("bc", 0, &[7; 32]).replacen("bc1q", "bc1p", 1),
            // Another network's prefix.
            "ltc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",
            "bc1qexampleaddress",
            "bc1q\u{202e}lacol-kcatta",
            "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4\u{7}",
            "bc1qw508d6qejxtdg4y5r3\u{200b}zarvary0c5xw7kv8f3t4",
            "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN3",
            "",
        ] {
            assert!(check("BTC", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keccak_and_eip55() {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(&keccak256(b"")),
            "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
        );
        // 200 bytes: more than one block.
        assert_eq!(keccak256(&[0x61; 200]).len(), 32);
        // EIP-55's examples.
        for ok in [
            "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
            "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
            "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
            "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
        ] {
            assert!(check("ETH", ok).is_ok(), "{ok}");
        }
        // One letter's case flipped: the checksum fails.
        assert!(check("ETH", "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD").is_err());
    }

    #[test]
    fn other_assets() {
        assert!(check("ETH", "0x52908400098527886E0F7030069857D2E4169EE7").is_ok());
        assert!(check("USDT", "0xde709f2102306220921060314715629080e2fb77").is_ok());
        assert!(check("ETH", "52908400098527886E0F7030069857D2E4169EE7").is_err());
        assert!(check("ETH", "0x52908400098527886E0F7030069857D2E4169EE").is_err());
        assert!(check("EUR", "DE89 3704 0044 0532 0130 00").is_ok());
        assert!(check("USD", "GB82WEST12345698765432").is_ok());
        assert!(check("EUR", "DE89 3704 0044 0532 0130 01").is_err());
        assert!(check("DOGE", "DH5yaieqoZN36fDVciNyRueRGvGLR3mr7L").is_ok());
        assert!(check("DOGE", "a b").is_err());
        assert!(check("DOGE", "a\u{202e}b").is_err());
    }
}
