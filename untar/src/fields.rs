//! Pure parsing of one 512-byte header block and of PAX records: no I/O, no allocation
//! beyond the names a header holds.

/// Size of a header block, and the unit archives are padded to.
pub const BLOCK: usize = 512;

/// Sparse map entries in a GNU header (offset, numbytes pairs at byte 386).
const GNU_SPARSE_IN_HEADER: usize = 4;
/// Sparse map entries in one GNU extension block.
const GNU_SPARSE_IN_EXTENSION: usize = 21;

/// A field that could not be read, by name.
pub type FieldError = &'static str;

/// The type flag of a header (byte 156).
pub fn type_flag(block: &[u8; BLOCK]) -> u8 {
    block[156]
}

/// Whether the block is all zeros (the end-of-archive marker).
pub fn is_zero_block(block: &[u8; BLOCK]) -> bool {
    block.iter().all(|&byte| byte == 0)
}

/// Checks the header's checksum (field at 148..156; the sum of all bytes with that field read
/// as spaces). Old archives summed signed bytes; both sums are accepted.
pub fn checksum_ok(block: &[u8; BLOCK]) -> bool {
    let Ok(stored) = number(&block[148..156]) else {
        return false;
    };
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (index, &byte) in block.iter().enumerate() {
        let byte = if (148..156).contains(&index) {
            b' '
        } else {
            byte
        };
        unsigned += u64::from(byte);
        signed += i64::from(byte as i8);
    }
    stored == unsigned || i64::try_from(stored).is_ok_and(|stored| stored == signed)
}

/// The entry's data size in the archive (field at 124..136).
pub fn size(block: &[u8; BLOCK]) -> Result<u64, FieldError> {
    number(&block[124..136]).map_err(|_| "size")
}

/// The header's own name: ustar's prefix joined with the name, or the name alone (GNU and old
/// headers keep other data where ustar has its prefix).
pub fn name(block: &[u8; BLOCK]) -> Vec<u8> {
    let name = until_nul(&block[0..100]);
    let is_ustar = &block[257..263] == b"ustar\0";
    let prefix = if is_ustar {
        until_nul(&block[345..500])
    } else {
        &[]
    };
    if prefix.is_empty() {
        name.to_vec()
    } else {
        let mut joined = Vec::with_capacity(prefix.len() + 1 + name.len());
        joined.extend_from_slice(prefix);
        joined.push(b'/');
        joined.extend_from_slice(name);
        joined
    }
}

/// The header's own link name (field at 157..257).
pub fn link_name(block: &[u8; BLOCK]) -> Vec<u8> {
    until_nul(&block[157..257]).to_vec()
}

/// Metadata data (a GNU long name or link) as the name it carries: up to the first NUL.
pub fn long_name(data: &[u8]) -> Vec<u8> {
    until_nul(data).to_vec()
}

fn until_nul(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// A numeric field that cannot be read (not octal, negative, or past 2^64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadNumber;

/// A numeric field: octal digits (leading spaces or NULs, ending at a space or NUL), or GNU's
/// base-256 form (high bit of the first byte set; negative numbers are refused).
pub fn number(field: &[u8]) -> Result<u64, BadNumber> {
    if field.first().is_some_and(|&first| first & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            return Err(BadNumber); // negative
        }
        let mut value: u64 = u64::from(field[0] & 0x3f);
        for &byte in &field[1..] {
            value = value.checked_mul(256).ok_or(BadNumber)? | u64::from(byte);
        }
        return Ok(value);
    }
    let digits = field
        .iter()
        .skip_while(|&&b| b == b' ' || b == 0)
        .take_while(|&&b| b != b' ' && b != 0);
    let mut value: u64 = 0;
    let mut any = false;
    for &digit in digits {
        if !(b'0'..=b'7').contains(&digit) {
            return Err(BadNumber);
        }
        value = value.checked_mul(8).ok_or(BadNumber)? + u64::from(digit - b'0');
        any = true;
    }
    if any || field.iter().all(|&b| b == b' ' || b == 0) {
        Ok(value)
    } else {
        Err(BadNumber)
    }
}

/// One run of stored data of a sparse file: `length` bytes at `offset` of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseBlock {
    /// Where the run starts in the file.
    pub offset: u64,
    /// How many bytes it holds.
    pub length: u64,
}

/// The sparse map entries of a GNU `S` header, whether extension blocks follow, and the
/// file's real size.
pub fn gnu_sparse_header(block: &[u8; BLOCK]) -> Result<(Vec<SparseBlock>, bool, u64), FieldError> {
    let map = sparse_entries(&block[386..386 + 24 * GNU_SPARSE_IN_HEADER])?;
    let extended = block[482] != 0;
    let real_size = number(&block[483..495]).map_err(|_| "sparse real size")?;
    Ok((map, extended, real_size))
}

/// The sparse map entries of a GNU extension block, and whether another one follows.
pub fn gnu_sparse_extension(block: &[u8; BLOCK]) -> Result<(Vec<SparseBlock>, bool), FieldError> {
    let map = sparse_entries(&block[..24 * GNU_SPARSE_IN_EXTENSION])?;
    Ok((map, block[504] != 0))
}

fn sparse_entries(area: &[u8]) -> Result<Vec<SparseBlock>, FieldError> {
    let mut blocks = Vec::new();
    for entry in area.chunks_exact(24) {
        if entry[0] == 0 {
            break; // an unused slot ends the list
        }
        let offset = number(&entry[..12]).map_err(|_| "sparse offset")?;
        let length = number(&entry[12..]).map_err(|_| "sparse length")?;
        blocks.push(SparseBlock { offset, length });
    }
    Ok(blocks)
}

/// What a PAX extended header says about the entry that follows it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PaxOverrides {
    /// `path`.
    pub path: Option<Vec<u8>>,
    /// `linkpath`.
    pub link: Option<Vec<u8>>,
    /// `size`.
    pub size: Option<u64>,
    /// Whether a `GNU.sparse.*` record is present (refused by the reader).
    pub gnu_sparse: bool,
}

/// Parses PAX records (`LENGTH key=value\n`, LENGTH counting the whole record).
pub fn pax_records(mut data: &[u8]) -> Result<PaxOverrides, &'static str> {
    let mut overrides = PaxOverrides::default();
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break; // padding some writers leave
        }
        let space = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or("a record has no length")?;
        let length: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|digits| digits.parse().ok())
            .ok_or("a record's length is not a number")?;
        if length <= space + 1 || length > data.len() {
            return Err("a record's length does not fit the header");
        }
        let record = &data[space + 1..length];
        let record = record
            .strip_suffix(b"\n")
            .ok_or("a record does not end with a newline")?;
        let equals = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or("a record has no '='")?;
        let (key, value) = (&record[..equals], &record[equals + 1..]);
        match key {
            b"path" => overrides.path = Some(value.to_vec()),
            b"linkpath" => overrides.link = Some(value.to_vec()),
            b"size" => {
                let size = std::str::from_utf8(value)
                    .ok()
                    .and_then(|digits| digits.parse().ok())
                    .ok_or("its size is not a number")?;
                overrides.size = Some(size);
            }
            key if key.starts_with(b"GNU.sparse.") => overrides.gnu_sparse = true,
            _ => {}
        }
        data = &data[length..];
    }
    Ok(overrides)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_octal_and_base_256() {
        assert_eq!(number(b"0000644\0"), Ok(0o644));
        assert_eq!(number(b"  777 \0"), Ok(0o777));
        assert_eq!(number(b"\0\0\0\0"), Ok(0));
        assert_eq!(number(b"12a4\0"), Err(BadNumber));
        assert_eq!(number(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Ok(256));
        assert_eq!(number(&[0xff; 12]), Err(BadNumber), "negative base-256");
        assert_eq!(
            number(&[0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(BadNumber)
        );
        assert_eq!(
            number(b"77777777777777777777777\0"),
            Err(BadNumber),
            "overflow"
        );
    }

    #[test]
    fn pax_records_are_parsed_and_bad_ones_refused() {
        let record = |key: &str, value: &str| {
            let body = format!(" {key}={value}\n");
            let mut length = body.len() + 1;
            if format!("{length}").len() > 1 {
                length = body.len() + format!("{}", body.len() + 2).len();
            }
            format!("{length}{body}")
        };
        let data = record("path", "a/very/long/name.txt")
            + &record("size", "123456789")
            + &record("GNU.sparse.map", "1");
        let parsed = pax_records(data.as_bytes()).unwrap();
        assert_eq!(parsed.path.as_deref(), Some(&b"a/very/long/name.txt"[..]));
        assert_eq!(parsed.size, Some(123_456_789));
        assert!(parsed.gnu_sparse);
        assert!(pax_records(b"99 path=x\n").is_err());
        assert!(pax_records(b"9 pathx\n").is_err());
        assert!(pax_records(b"x path=x\n").is_err());
        assert!(pax_records(b"12 size=12z\n").is_err());
        assert!(pax_records(b"2 \n").is_err());
    }
}
