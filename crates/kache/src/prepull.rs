//! What a node pre-pull pod runs. Its init containers run each image of the set to completion,
//! so that the kubelet pulls it; most images have no shell to run `true` with, some are built
//! from scratch, and each may run as any user. So each runs the same program, written into an
//! emptyDir by the first init container (`kache prepull programs`): a static ELF executable of a
//! few dozen bytes that only exits 0, needing no libc, no loader and no file of the image. The
//! pod's one long-running container runs its twin, `hold`, which waits for SIGTERM or SIGINT and
//! exits 0: a few pages of memory, where a Rust program's start-up alone touches a few MiB.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

mod convert;

#[derive(clap::Args, Debug)]
pub struct PrepullArgs {
    #[command(subcommand)]
    command: PrepullCommand,
}

#[derive(clap::Subcommand, Debug)]
enum PrepullCommand {
    /// Write the programs of a node pre-pull pod for this machine into `--dir`: `noop`, a static
    /// executable that exits 0, for the set's images to run, and `hold`, one that waits for
    /// SIGTERM or SIGINT and exits 0, for the pod's long-running container.
    Programs {
        /// Where to write them (mode 0555), normally an emptyDir.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Print a kubernetes-image-puller configuration as a NodeImageSet (YAML on stdout, for
    /// `kubectl apply -f -`): its ConfigMap from a file (`-` for stdin), or its IMAGES string.
    Convert {
        /// The puller's ConfigMap (YAML or JSON); `-` reads stdin.
        #[arg(required_unless_present = "images", conflicts_with = "images")]
        config_map: Option<PathBuf>,
        /// The puller's IMAGES value instead: `name=image;name=image;`.
        #[arg(long)]
        images: Option<String>,
        /// The NodeImageSet's name (default: the ConfigMap's name, else `image-puller`).
        #[arg(long)]
        name: Option<String>,
        /// The namespace of the pull secrets, when the ConfigMap names none (`NAMESPACE`).
        #[arg(long)]
        namespace: Option<String>,
    },
}

/// Runs a `kache prepull` command.
pub fn run(a: &PrepullArgs) -> anyhow::Result<()> {
    match &a.command {
        PrepullCommand::Programs { dir } => {
            write_program(Program::Noop, &dir.join("noop"))?;
            write_program(Program::Hold, &dir.join("hold"))
        }
        PrepullCommand::Convert {
            config_map,
            images,
            name,
            namespace,
        } => {
            let config = match (config_map, images) {
                (_, Some(images)) => convert::PullerConfig::from_images(images),
                (Some(path), None) => {
                    let text = if path.as_os_str() == "-" {
                        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
                    } else {
                        std::fs::read_to_string(path)
                            .with_context(|| format!("reading {}", path.display()))?
                    };
                    convert::PullerConfig::from_config_map(&text)?
                }
                (None, None) => anyhow::bail!("give a ConfigMap file or --images"),
            };
            let (set, left_out) = convert::convert(&config, name.as_deref(), namespace.as_deref())?;
            if !left_out.is_empty() {
                eprintln!(
                    "left out (a NodeImageSet's pods hold one small container, and its DaemonSet is named after it): {}",
                    left_out.join(", ")
                );
            }
            print!("{}", serde_yaml::to_string(&set)?);
            Ok(())
        }
    }
}

/// The programs of a pre-pull pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// Exits 0.
    Noop,
    /// Blocks SIGTERM and SIGINT, waits for either (`rt_sigtimedwait`), then exits 0. Blocked,
    /// not handled: a container's first process never gets a signal it has no handler for
    /// unless the signal is blocked (then it is queued for the wait), and a handler needs code.
    Hold,
}

/// Writes `program` for this machine's architecture to `out`, replacing what is there.
pub fn write_program(program: Program, out: &Path) -> anyhow::Result<()> {
    let elf = program_elf(program, std::env::consts::ARCH)
        .with_context(|| format!("no pre-pull programs for {}", std::env::consts::ARCH))?;
    let tmp = out.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o555)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&elf)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))
}

/// Where the program is loaded: the conventional base of a static executable, aligned for 64
/// KiB pages too.
const BASE: u64 = 0x40_0000;
const ELF_HEADER: usize = 64;
const PROGRAM_HEADER: usize = 56;

/// The machine code of `program` for `arch` (Rust's names: `x86_64`, `aarch64`), with the ELF
/// machine number. The signal set `hold` waits for is SIGINT (2) and SIGTERM (15): bits 1, 14.
fn code(program: Program, arch: &str) -> Option<(u16, &'static [u8])> {
    Some(match (arch, program) {
        // mov eax, 60 (exit); xor edi, edi; syscall
        ("x86_64", Program::Noop) => (0x3e, &[0xb8, 0x3c, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05]),
        ("x86_64", Program::Hold) => (
            0x3e,
            &[
                0x68, 0x02, 0x40, 0x00, 0x00, // push 0x4002: the set, on the stack
                0x48, 0x89, 0xe6, // mov rsi, rsp
                0x31, 0xff, // xor edi, edi: SIG_BLOCK
                0x31, 0xd2, // xor edx, edx: no old set
                0x41, 0xba, 0x08, 0x00, 0x00, 0x00, // mov r10d, 8: the set's size
                0xb8, 0x0e, 0x00, 0x00, 0x00, // mov eax, 14: rt_sigprocmask
                0x0f, 0x05, // syscall
                0x48, 0x89, 0xe7, // wait: mov rdi, rsp
                0x31, 0xf6, // xor esi, esi: no siginfo
                0x31, 0xd2, // xor edx, edx: no timeout
                0x41, 0xba, 0x08, 0x00, 0x00, 0x00, // mov r10d, 8
                0xb8, 0x80, 0x00, 0x00, 0x00, // mov eax, 128: rt_sigtimedwait
                0x0f, 0x05, // syscall
                0x48, 0x85, 0xc0, // test rax, rax
                0x7e, 0xe7, // jle wait: interrupted, wait again
                0x31, 0xff, // xor edi, edi
                0xb8, 0x3c, 0x00, 0x00, 0x00, // mov eax, 60: exit
                0x0f, 0x05, // syscall
            ],
        ),
        // mov x0, #0; mov x8, #93 (exit); svc #0
        ("aarch64", Program::Noop) => (
            0xb7,
            &[
                0x00, 0x00, 0x80, 0xd2, 0xa8, 0x0b, 0x80, 0xd2, 0x01, 0x00, 0x00, 0xd4,
            ],
        ),
        ("aarch64", Program::Hold) => (
            0xb7,
            &[
                0x40, 0x00, 0x88, 0xd2, // mov x0, #0x4002: the set
                0xe0, 0x0f, 0x1f, 0xf8, // str x0, [sp, #-16]!
                0xe1, 0x03, 0x00, 0x91, // mov x1, sp
                0x00, 0x00, 0x80, 0xd2, // mov x0, #0: SIG_BLOCK
                0x02, 0x00, 0x80, 0xd2, // mov x2, #0: no old set
                0x03, 0x01, 0x80, 0xd2, // mov x3, #8: the set's size
                0xe8, 0x10, 0x80, 0xd2, // mov x8, #135: rt_sigprocmask
                0x01, 0x00, 0x00, 0xd4, // svc #0
                0xe0, 0x03, 0x00, 0x91, // wait: mov x0, sp
                0x01, 0x00, 0x80, 0xd2, // mov x1, #0: no siginfo
                0x02, 0x00, 0x80, 0xd2, // mov x2, #0: no timeout
                0x03, 0x01, 0x80, 0xd2, // mov x3, #8
                0x28, 0x11, 0x80, 0xd2, // mov x8, #137: rt_sigtimedwait
                0x01, 0x00, 0x00, 0xd4, // svc #0
                0x1f, 0x00, 0x00, 0xf1, // cmp x0, #0
                0x2d, 0xff, 0xff, 0x54, // b.le wait: interrupted, wait again
                0x00, 0x00, 0x80, 0xd2, // mov x0, #0
                0xa8, 0x0b, 0x80, 0xd2, // mov x8, #93: exit
                0x01, 0x00, 0x00, 0xd4, // svc #0
            ],
        ),
        _ => return None,
    })
}

/// A static ELF64 executable of `program` for `arch`: one loadable segment, no interpreter, no
/// sections. `None` for an architecture it has no code for.
pub fn program_elf(program: Program, arch: &str) -> Option<Vec<u8>> {
    let (machine, code) = code(program, arch)?;
    let entry = BASE + (ELF_HEADER + PROGRAM_HEADER) as u64;
    let size = (ELF_HEADER + PROGRAM_HEADER + code.len()) as u64;
    let mut elf = Vec::with_capacity(size as usize);
    // e_ident: magic, 64-bit, little-endian, version 1, System V, padding.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: an executable
    elf.extend_from_slice(&machine.to_le_bytes());
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&entry.to_le_bytes());
    elf.extend_from_slice(&(ELF_HEADER as u64).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(ELF_HEADER as u16).to_le_bytes());
    elf.extend_from_slice(&(PROGRAM_HEADER as u16).to_le_bytes());
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    // One PT_LOAD segment, read and execute, mapping the whole file at BASE.
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes());
    elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&size.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&size.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1_0000u64.to_le_bytes()); // p_align
    elf.extend_from_slice(code);
    debug_assert_eq!(elf.len() as u64, size);
    Some(elf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_no_op_runs_and_exits_0_with_nothing_around_it() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("noop");
        write_program(Program::Noop, &out).unwrap();
        let mode = std::fs::metadata(&out).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o555
        );
        // Run with nothing around it: no environment, no working directory of its own.
        let status = std::process::Command::new(&out)
            .env_clear()
            .current_dir("/")
            .status()
            .unwrap();
        assert!(status.success(), "{status:?}");
        // Written again over the first (a restarted init container).
        write_program(Program::Noop, &out).unwrap();
        assert!(std::process::Command::new(&out).status().unwrap().success());
    }

    #[test]
    fn the_programs_are_tiny_static_executables_for_each_architecture() {
        for program in [Program::Noop, Program::Hold] {
            for (arch, machine) in [("x86_64", 0x3e_u16), ("aarch64", 0xb7)] {
                let elf = program_elf(program, arch).unwrap();
                assert!(elf.len() <= 256, "{arch}: {} bytes", elf.len());
                assert_eq!(&elf[..4], b"\x7fELF");
                assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), machine);
                // No interpreter, no dynamic section: one PT_LOAD only.
                assert_eq!(u16::from_le_bytes([elf[56], elf[57]]), 1, "one segment");
                assert_eq!(u32::from_le_bytes(elf[64..68].try_into().unwrap()), 1);
            }
            assert_eq!(program_elf(program, "riscv64"), None);
        }
    }
}
