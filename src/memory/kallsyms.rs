//! The guest kernel's own symbol table (kallsyms), read from its memory: Linux 6.0 and later
//! name its tables in VMCOREINFO (`SYMBOL(kallsyms_names)`, `kallsyms_num_syms`,
//! `kallsyms_token_table`, `kallsyms_token_index`, `kallsyms_offsets` with
//! `kallsyms_relative_base`, or `kallsyms_addresses` where the kernel stores them whole).
//!
//! The encoding (Linux's scripts/kallsyms.c writes it, kernel/kallsyms.c reads it):
//! - `kallsyms_names` holds one entry per symbol, in address order: a length (one byte, or two
//!   when the first has its top bit set: the low 7 bits, then 8 more) and that many token
//!   numbers. Each token number indexes `kallsyms_token_index` (256 u16), an offset into
//!   `kallsyms_token_table`, where the token is a NUL-terminated string. The tokens of an
//!   entry spell the symbol's type letter (`T`, `t`, `D`, ...) then its name.
//! - `kallsyms_offsets` holds one i32 per symbol. Without absolute per-CPU symbols the address
//!   is `relative_base + (u32)offset`. With them (`CONFIG_KALLSYMS_ABSOLUTE_PERCPU`, x86-64 SMP
//!   before 6.15) a non-negative offset is the (per-CPU) address itself and a negative one
//!   means `relative_base - 1 - offset`. Which rule applies is not in VMCOREINFO: a kernel
//!   image is smaller than 2 GiB, so relative offsets never have the sign bit, and any
//!   negative offset means the absolute rule; the result is checked against VMCOREINFO's own
//!   `SYMBOL(_stext)`.
//!
//! Modules keep theirs in `struct module`, whose layout VMCOREINFO does not describe: they
//! are read by [`super::modules`] with the layout from the kernel's BTF.
//!
//! Everything is guest-written: every table is read whole within the reader's budget, at most
//! the size VMCOREINFO's addresses leave room for, the symbol count is capped, every index is
//! checked, names are cut at the kernel's own limit, and the decode visits each entry once.

use std::time::Duration;

use tokio::time::Instant;

use super::translate::KernelMap;
use super::vmcoreinfo::Vmcoreinfo;
use super::{le_u16, le_u32, le_u64, Budget, MemError, PhysRead, QmpMemory};
use crate::trigger::qmp::Qmp;
use crate::verdict::symbols::{SymbolEntry, Symbols};

/// The most symbols read (a Debian kernel with `CONFIG_KALLSYMS_ALL` has about 200,000).
pub const MAX_SYMBOLS: u32 = 1 << 21;
/// The largest `kallsyms_names` read (about 12 bytes a symbol in practice).
const MAX_NAMES: u64 = 32 << 20;
/// `KSYM_NAME_LEN`: the kernel's longest name, type letter included; longer ones are corrupt.
const MAX_NAME: usize = 512;
/// The longest token (they merge pairs of pairs: a few dozen bytes in practice).
const MAX_TOKEN: usize = 256;

/// One symbol of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSymbol {
    pub addr: u64,
    /// `T`, `t`, `D`, `A`, ... as /proc/kallsyms shows it.
    pub kind: char,
    pub name: String,
}

/// The table's addresses, from VMCOREINFO.
#[derive(Clone, Copy, Debug)]
struct Layout {
    names: u64,
    num_syms: u64,
    token_table: u64,
    token_index: u64,
    /// `(kallsyms_offsets, kallsyms_relative_base)`, or `kallsyms_addresses`.
    addrs: Addrs,
}

#[derive(Clone, Copy, Debug)]
enum Addrs {
    Relative { offsets: u64, base: u64 },
    Absolute { addresses: u64 },
}

impl Layout {
    fn from(v: &Vmcoreinfo) -> Result<Layout, MemError> {
        let need = |name: &str| {
            v.symbol(name).ok_or_else(|| MemError::NoKallsyms {
                osrelease: v.osrelease().unwrap_or("unknown").to_string(),
                missing: format!("SYMBOL({name})"),
            })
        };
        let names = need("kallsyms_names")?;
        let num_syms = need("kallsyms_num_syms")?;
        let token_table = need("kallsyms_token_table")?;
        let token_index = need("kallsyms_token_index")?;
        let addrs = match v.symbol("kallsyms_addresses") {
            Some(addresses) => Addrs::Absolute { addresses },
            None => {
                Addrs::Relative { offsets: need("kallsyms_offsets")?, base: need("kallsyms_relative_base")? }
            }
        };
        Ok(Layout { names, num_syms, token_table, token_index, addrs })
    }

    /// The tables' starts, to bound one by the next above it.
    fn starts(&self) -> Vec<u64> {
        let mut s = vec![self.names, self.num_syms, self.token_table, self.token_index];
        match self.addrs {
            Addrs::Relative { offsets, base } => s.extend([offsets, base]),
            Addrs::Absolute { addresses } => s.push(addresses),
        }
        s
    }

    /// How many bytes from `start` up to the next table above it, `None` if none is above.
    fn room(&self, start: u64) -> Option<u64> {
        self.starts().into_iter().filter(|&s| s > start).map(|s| s - start).min()
    }
}

/// The tables as read, for [`decode`].
#[derive(Clone, Debug, Default)]
pub struct Tables {
    pub num_syms: u32,
    pub names: Vec<u8>,
    pub token_table: Vec<u8>,
    pub token_index: Vec<u8>,
    /// One i32 per symbol (relative), or one u64 (absolute, `relative_base` unused).
    pub offsets: Vec<u8>,
    pub absolute: bool,
    pub relative_base: u64,
}

/// Reads the kernel image's symbols within `mem`'s budget, at most `max_symbols` of them.
pub async fn read_kallsyms<M: PhysRead>(
    mem: &mut M,
    info: &Vmcoreinfo,
    map: &KernelMap,
    max_symbols: u32,
) -> Result<Vec<KernelSymbol>, MemError> {
    let l = Layout::from(info)?;
    let corrupt = |what: String| MemError::Corrupt(format!("kallsyms: {what}"));
    let raw = map.read_virt(mem, l.num_syms, 4).await?;
    let num_syms = le_u32(&raw, 0).unwrap_or(0);
    if num_syms == 0 || num_syms > max_symbols.min(MAX_SYMBOLS) {
        return Err(corrupt(format!(
            "kallsyms_num_syms is {num_syms}, want 1 to {}",
            max_symbols.min(MAX_SYMBOLS)
        )));
    }
    let n = u64::from(num_syms);
    let token_index = map.read_virt(mem, l.token_index, 512).await?;
    let max_index = (0..256).filter_map(|i| le_u16(&token_index, i * 2)).max().unwrap_or(0);
    // The last token starts at the largest index and ends with its NUL, at most MAX_TOKEN on.
    let mut table_len = u64::from(max_index) + MAX_TOKEN as u64 + 1;
    if let Some(room) = l.room(l.token_table) {
        table_len = table_len.min(room);
    }
    let token_table = map.read_virt(mem, l.token_table, table_len as usize).await?;
    let (offsets, absolute, relative_base) = match l.addrs {
        Addrs::Relative { offsets, base } => {
            let o = map.read_virt(mem, offsets, (n * 4) as usize).await?;
            (o, false, map.read_u64(mem, base).await?)
        }
        Addrs::Absolute { addresses } => (map.read_virt(mem, addresses, (n * 8) as usize).await?, true, 0),
    };
    // Each entry is at least a length and a token; at most two length bytes and MAX_NAME tokens.
    let most = (n * (2 + MAX_NAME as u64)).min(MAX_NAMES);
    let names_len = match l.room(l.names) {
        Some(room) if room >= 2 * n => room.min(most),
        Some(room) => {
            return Err(corrupt(format!("kallsyms_names has room for {room} bytes, not {n} symbols")))
        }
        None => most,
    };
    let names = map.read_virt(mem, l.names, names_len as usize).await?;
    let tables = Tables { num_syms, names, token_table, token_index, offsets, absolute, relative_base };
    let syms = decode(&tables)?;
    // The kernel's own word on where its text starts checks the address rule and the tables.
    if let Some(stext) = info.symbol("_stext") {
        match syms.iter().find(|s| s.name == "_stext") {
            Some(s) if s.addr == stext => {}
            Some(s) => {
                return Err(corrupt(format!(
                    "_stext decodes to {:#x} but VMCOREINFO says {stext:#x}: the tables are corrupt or of another kernel",
                    s.addr
                )))
            }
            None => return Err(corrupt("no _stext among the symbols".into())),
        }
    }
    Ok(syms)
}

/// Decodes `t` into symbols; an entry or token out of its table's bounds is an error.
pub fn decode(t: &Tables) -> Result<Vec<KernelSymbol>, MemError> {
    let corrupt = |what: String| MemError::Corrupt(format!("kallsyms: {what}"));
    let n = t.num_syms as usize;
    let word = if t.absolute { 8 } else { 4 };
    if t.offsets.len() / word < n {
        return Err(corrupt(format!("{} bytes of addresses for {n} symbols", t.offsets.len())));
    }
    // Every token expanded once (guest-written: cut at MAX_TOKEN, an index past the table empty).
    let tokens: Vec<&[u8]> = (0..256)
        .map(|i| {
            let at = le_u16(&t.token_index, i * 2).map_or(usize::MAX, usize::from);
            let rest = t.token_table.get(at..).unwrap_or_default();
            let rest = &rest[..rest.len().min(MAX_TOKEN)];
            rest.split(|&b| b == 0).next().unwrap_or_default()
        })
        .collect();
    let raw: Vec<i32> = (0..n).filter_map(|i| le_u32(&t.offsets, i * 4).map(|v| v as i32)).collect();
    // A kernel image is smaller than 2 GiB: relative offsets never look negative.
    let absolute_percpu = !t.absolute && raw.iter().any(|&o| o < 0);
    let mut out = Vec::with_capacity(n);
    let mut pos = 0usize;
    let mut name = Vec::with_capacity(MAX_NAME);
    for i in 0..n {
        let end_of_names = || corrupt(format!("kallsyms_names ends inside symbol {i} of {n}"));
        let first = *t.names.get(pos).ok_or_else(end_of_names)?;
        let len = if first & 0x80 != 0 {
            let second = *t.names.get(pos + 1).ok_or_else(end_of_names)?;
            pos += 2;
            usize::from(first & 0x7f) | usize::from(second) << 7
        } else {
            pos += 1;
            usize::from(first)
        };
        let codes = t.names.get(pos..pos + len).ok_or_else(end_of_names)?;
        pos += len;
        name.clear();
        for &c in codes {
            name.extend_from_slice(tokens[usize::from(c)]);
            if name.len() > MAX_NAME {
                return Err(corrupt(format!("symbol {i}'s name is longer than {MAX_NAME} bytes")));
            }
        }
        let Some((&kind, rest)) = name.split_first() else {
            return Err(corrupt(format!("symbol {i} has an empty name")));
        };
        let addr = if t.absolute {
            le_u64(&t.offsets, i * 8).unwrap_or(0)
        } else {
            let o = raw.get(i).copied().unwrap_or(0);
            if !absolute_percpu {
                t.relative_base.wrapping_add(u64::from(o as u32))
            } else if o >= 0 {
                o as u64
            } else {
                // -1 - o, computed without overflow for i32::MIN.
                t.relative_base.wrapping_add(u64::from(!(o as u32)))
            }
        };
        out.push(KernelSymbol {
            addr,
            kind: char::from(kind),
            name: String::from_utf8_lossy(rest).into_owned(),
        });
    }
    Ok(out)
}

/// What reading the symbols cost.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KallsymsStats {
    /// The kernel image's symbols, all types.
    pub symbols: usize,
    /// Modules whose symbols were read, and their function symbols.
    pub modules: usize,
    pub module_symbols: usize,
    /// Why modules' symbols are missing, when they are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modules_error: Option<String>,
    pub bytes: u64,
    pub pmemsave_calls: u64,
    pub elapsed_ms: u64,
}

/// The default cost limit of one read: a Debian kernel's tables are about 3 MiB, its BTF 5 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 48 << 20;

/// The guest's kernel symbols as a [`Symbols`] (text symbols), the kernel image's and its
/// loaded modules' (those when its BTF says where they are), read through `qmp` with at most
/// `max_bytes` read within `time`; QEMU's temporary files go to `dir`.
pub async fn read_symbols(
    qmp: &Qmp,
    dir: &std::path::Path,
    info: &Vmcoreinfo,
    max_bytes: u64,
    time: Duration,
) -> Result<(Symbols, KallsymsStats), MemError> {
    let start = Instant::now();
    let map = KernelMap::from_vmcoreinfo(info)?;
    let mut mem = QmpMemory::new(qmp, dir, Budget::new(max_bytes, time));
    let syms = read_kallsyms(&mut mem, info, &map, MAX_SYMBOLS).await?;
    let (modules, modules_error) = match super::modules::read_module_symbols(&mut mem, &map, &syms).await {
        Ok(m) => (m, None),
        Err(e) => ((Vec::new(), 0), Some(e)),
    };
    let stats = KallsymsStats {
        symbols: syms.len(),
        modules: modules.1,
        module_symbols: modules.0.len(),
        modules_error,
        bytes: PhysRead::budget(&mem).used(),
        pmemsave_calls: mem.calls(),
        elapsed_ms: start.elapsed().as_millis() as u64,
    };
    Ok((into_symbols(syms, modules.0, info), stats))
}

/// `syms` (and modules' `extra`) as the project's symbol lookup, its source naming the kernel.
pub fn into_symbols(syms: Vec<KernelSymbol>, extra: Vec<SymbolEntry>, info: &Vmcoreinfo) -> Symbols {
    let source = format!("the guest's kallsyms ({})", info.osrelease().unwrap_or("unknown kernel"));
    let image = syms.into_iter().map(|s| SymbolEntry {
        addr: s.addr,
        size: 0,
        kind: s.kind,
        name: s.name,
        module: None,
    });
    Symbols::from_entries(image.chain(extra), &source)
}
