//! A symbol source for the guest kernel: a `System.map`, a copy of `/proc/kallsyms` (both
//! `ADDRESS TYPE NAME [MODULE]` lines) or a `vmlinux` ELF with its symbol table, which the user
//! names with `[diagnostics] symbols = PATH`, or the guest's own kallsyms read from its memory
//! ([`crate::memory::kallsyms`], [`Symbols::from_entries`]). Turns an address into
//! `func+0x1c/0x30 [module]`.
//!
//! A `System.map` or `vmlinux` has link-time addresses: a guest with KASLR runs its kernel
//! elsewhere. When the map's `_text` is at the link-time base and the console printed the
//! kernel's `Kernel Offset: 0x... from 0xffffffff81000000`, the offset is applied
//! ([`Symbols::relocated`]); a kallsyms copy from the running boot is exact as it is.

use std::path::Path;

/// The largest symbol file read, text or ELF.
pub const MAX_FILE: u64 = 1 << 30;
/// At most this many symbols are kept.
const MAX_SYMBOLS: usize = 4_000_000;
/// Where x86_64 kernels are linked (`_text` without KASLR).
pub const LINK_BASE: u64 = 0xffff_ffff_8100_0000;
/// No function is this large: an address this far past the last symbol before it is unknown.
const MAX_SPAN: u64 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Sym {
    addr: u64,
    /// From the ELF symbol table; 0 when the source gives none (a map).
    size: u64,
    name: String,
    module: Option<String>,
}

/// Symbols sorted by address.
#[derive(Clone, Debug, Default)]
pub struct Symbols {
    syms: Vec<Sym>,
    /// Added to the source's kernel-image addresses (KASLR), 0 as loaded.
    offset: u64,
    /// Where they came from, for evidence lines.
    pub source: String,
}

/// One symbol for [`Symbols::from_entries`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolEntry {
    pub addr: u64,
    /// 0 when the source gives none: the next symbol's address ends it.
    pub size: u64,
    /// `T`, `t`, `D`, ... as /proc/kallsyms shows it.
    pub kind: char,
    pub name: String,
    pub module: Option<String>,
}

/// An address resolved: `name+0xoff/0xsize [module]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub name: String,
    pub offset: u64,
    pub size: u64,
    pub module: Option<String>,
}

impl std::fmt::Display for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}+{:#x}/{:#x}", self.name, self.offset, self.size)?;
        if let Some(m) = &self.module {
            write!(f, " [{m}]")?;
        }
        Ok(())
    }
}

impl Symbols {
    /// Loads `path`: an ELF file (by its magic) through its symbol table, else map lines.
    /// Blocking: call it off the async workers.
    pub fn load(path: &Path) -> Result<Symbols, String> {
        let shown = path.display();
        let meta =
            std::fs::metadata(path).map_err(|e| format!("cannot read the symbol file {shown}: {e}"))?;
        if meta.len() > MAX_FILE {
            return Err(format!(
                "the symbol file {shown} is {} bytes, more than the {MAX_FILE} read; point symbols at a System.map",
                meta.len()
            ));
        }
        let file =
            std::fs::File::open(path).map_err(|e| format!("cannot read the symbol file {shown}: {e}"))?;
        // SAFETY: the map is only read while `file` is open and this function runs; a file
        // truncated underneath would fault, which is why the symbol file is the user's own,
        // not the guest's.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| format!("cannot read the symbol file {shown}: {e}"))?;
        let mut syms = if map.starts_with(b"\x7fELF") {
            elf(&map)
                .map_err(|e| format!("the symbol file {shown} is an ELF file without usable symbols: {e}"))?
        } else {
            parse_map(&String::from_utf8_lossy(&map))
        };
        if syms.is_empty() {
            return Err(format!(
                "the symbol file {shown} has no text symbols: give a System.map (e.g. from the kernel's -dbg \
                 package), a copy of the guest's /proc/kallsyms, or a vmlinux with its symbol table"
            ));
        }
        sort(&mut syms);
        Ok(Symbols { syms, offset: 0, source: path.display().to_string() })
    }

    /// Symbols from map text (`ADDRESS TYPE NAME [MODULE]` lines), for tests and callers that
    /// hold the text.
    pub fn from_map(text: &str, source: &str) -> Symbols {
        let mut syms = parse_map(text);
        sort(&mut syms);
        Symbols { syms, offset: 0, source: source.into() }
    }

    /// Symbols from entries (e.g. the guest's kallsyms and its modules' symbol tables, read
    /// from its memory): text symbols only (`t`/`T`/`w`/`W`), as from a map.
    pub fn from_entries(entries: impl IntoIterator<Item = SymbolEntry>, source: &str) -> Symbols {
        let mut syms: Vec<Sym> = entries
            .into_iter()
            .filter(|e| {
                e.addr != 0
                    && matches!(e.kind, 't' | 'T' | 'w' | 'W')
                    && !e.name.is_empty()
                    && e.name.len() <= 512
            })
            .take(MAX_SYMBOLS)
            .map(|e| Sym { addr: e.addr, size: e.size, name: e.name, module: e.module })
            .collect();
        sort(&mut syms);
        Symbols { syms, offset: 0, source: source.into() }
    }

    pub fn len(&self) -> usize {
        self.syms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    /// Where `_text` is in the source.
    fn text_base(&self) -> Option<u64> {
        self.syms.iter().find(|s| s.name == "_text" || s.name == "_stext").map(|s| s.addr)
    }

    /// Applies the KASLR offset the console reported, when the source has link-time addresses
    /// (its `_text` at [`LINK_BASE`]); a source from the running boot is left as it is.
    pub fn relocated(mut self, kaslr: Option<u64>) -> Symbols {
        if let (Some(off), Some(LINK_BASE)) = (kaslr, self.text_base()) {
            self.offset = off;
        }
        self
    }

    /// The symbol at `addr`, with its offset and size.
    pub fn lookup(&self, addr: u64) -> Option<Resolved> {
        let resolve = |a: u64| -> Option<Resolved> {
            let i = self.syms.partition_point(|s| s.addr <= a).checked_sub(1)?;
            let s = &self.syms[i];
            let off = a - s.addr;
            let size = if s.size > 0 { s.size } else { self.syms.get(i + 1).map_or(0, |n| n.addr - s.addr) };
            if size == 0 || off >= size || off > MAX_SPAN {
                return None;
            }
            Some(Resolved { name: s.name.clone(), offset: off, size, module: s.module.clone() })
        };
        // The image moved by the offset; modules are where kallsyms says.
        if self.offset != 0 {
            if let Some(r) = addr.checked_sub(self.offset).and_then(resolve) {
                if r.module.is_none() {
                    return Some(r);
                }
            }
        }
        resolve(addr)
    }
}

/// By address; of the names at one address, a function's before markers (`__cpuidle_text_start`
/// beside `default_idle`), and only that one kept.
fn sort(syms: &mut Vec<Sym>) {
    syms.sort_by(|a, b| {
        a.addr
            .cmp(&b.addr)
            .then(a.name.starts_with('_').cmp(&b.name.starts_with('_')))
            .then(a.name.cmp(&b.name))
    });
    syms.dedup_by(|later, first| later.addr == first.addr);
}

/// `Kernel Offset: 0x2a000000 from 0xffffffff81000000 (relocation range: ...)`, as the kernel
/// prints it on panic: the KASLR offset.
pub fn kaslr_offset(console: &str) -> Option<u64> {
    let line = console.lines().rev().find(|l| l.len() < 256 && l.contains("Kernel Offset: 0x"))?;
    let rest = &line[line.find("Kernel Offset: 0x")? + "Kernel Offset: 0x".len()..];
    let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).take(16).collect();
    let off = u64::from_str_radix(&hex, 16).ok()?;
    rest.contains(&format!("from {LINK_BASE:#x}")).then_some(off)
}

/// Text symbols (`t`/`T`/`w`/`W`) of map lines; other lines are ignored.
fn parse_map(text: &str) -> Vec<Sym> {
    let mut out = Vec::new();
    for line in text.lines() {
        if out.len() >= MAX_SYMBOLS {
            break;
        }
        if line.len() > 512 {
            continue;
        }
        let mut f = line.split_ascii_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else { continue };
        if !matches!(kind, "t" | "T" | "w" | "W") || addr.len() > 16 {
            continue;
        }
        let Ok(addr) = u64::from_str_radix(addr, 16) else { continue };
        if addr == 0 {
            // kallsyms read without the right to see addresses: every line is 0.
            continue;
        }
        let module =
            f.next().and_then(|m| m.strip_prefix('[')).and_then(|m| m.strip_suffix(']')).map(str::to_string);
        out.push(Sym { addr, size: 0, name: name.to_string(), module });
    }
    out
}

/// Function symbols of an ELF file's symbol table.
fn elf(data: &[u8]) -> Result<Vec<Sym>, String> {
    use object::{Object, ObjectSymbol, SymbolKind};
    let file = object::File::parse(data).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for s in file.symbols() {
        if out.len() >= MAX_SYMBOLS {
            break;
        }
        if s.kind() != SymbolKind::Text || s.address() == 0 {
            continue;
        }
        let Ok(name) = s.name() else { continue };
        if name.is_empty() || name.len() > 512 {
            continue;
        }
        out.push(Sym { addr: s.address(), size: s.size(), name: name.to_string(), module: None });
    }
    if out.is_empty() {
        return Err(
            "no function symbols (a stripped vmlinux; use the one from the kernel's -dbg package)".into()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines of the fixture kernel's (Debian 6.1.0-57-amd64) /proc/kallsyms, booted without KASLR,
    /// around the addresses the tests read.
    const MAP: &str = include_str!("testdata/kallsyms-6.1.0-57-amd64.txt");

    #[test]
    fn symbolises_a_real_map() {
        let s = Symbols::from_map(MAP, "kallsyms");
        assert_eq!(s.len(), 10);
        let r = s.lookup(0xffffffff81a592eb).expect("the idle vCPU's RIP is in the map");
        assert_eq!(r.to_string(), "native_safe_halt+0xb/0x10");
        assert_eq!(s.lookup(0xffffffff81a59180).unwrap().to_string(), "default_idle+0x0/0x10");
        // Before the first symbol: nothing.
        assert_eq!(s.lookup(0x1000), None);
    }

    #[test]
    fn sizes_come_from_the_next_symbol_and_modules_are_named() {
        let text = "ffffffff81000000 T _text\nffffffff81000010 T a\nffffffff81000040 t b\n\
                    ffffffff81000050 D data\nffffffffc0236000 t spin_fn\t[faults]\nffffffffc0236080 t other\t[faults]\n\
                    0000000000000000 A fixed_percpu_data\nnot a line\n";
        let s = Symbols::from_map(text, "t");
        assert_eq!(s.lookup(0xffffffff8100002c).unwrap().to_string(), "a+0x1c/0x30");
        assert_eq!(s.lookup(0xffffffffc023604c).unwrap().to_string(), "spin_fn+0x4c/0x80 [faults]");
        // The last symbol has no end: unknown.
        assert_eq!(s.lookup(0xffffffffc0236090), None);
        // KASLR: link-time map, offset from the console.
        let console = "[   12.0] Kernel Offset: 0x2a000000 from 0xffffffff81000000 (relocation range: \
                       0xffffffff80000000-0xffffffffbfffffff)\n";
        assert_eq!(kaslr_offset(console), Some(0x2a000000));
        let moved = s.clone().relocated(kaslr_offset(console));
        assert_eq!(moved.lookup(0xffffffffab00002c).unwrap().to_string(), "a+0x1c/0x30");
        assert_eq!(moved.lookup(0xffffffffc023604c).unwrap().to_string(), "spin_fn+0x4c/0x80 [faults]");
        assert_eq!(kaslr_offset("Kernel Offset: disabled\n"), None);
    }

    #[test]
    fn loads_files_and_refuses_empty_ones() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("System.map");
        std::fs::write(&map, MAP).unwrap();
        assert!(Symbols::load(&map).unwrap().lookup(0xffffffff81a592eb).is_some());
        // Debian's own System.map is a placeholder.
        std::fs::write(
            &map,
            "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n",
        )
        .unwrap();
        let e = Symbols::load(&map).unwrap_err();
        assert!(e.contains("no text symbols"), "{e}");
        // A stripped ELF: the test binary's own symbols are there; an ELF header alone is not.
        std::fs::write(&map, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(Symbols::load(&map).unwrap_err().contains("ELF"));
        let me = std::env::current_exe().unwrap();
        let own = Symbols::load(&me).unwrap();
        assert!(own.len() > 100);
    }
}
