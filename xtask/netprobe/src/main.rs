//! The container side of `cargo xtask bench net`, the same binary in the
//! bulkhead container and in the runc one, so that both pay the same tool
//! costs and the ratios compare the data paths. busybox's `nc` moved data in
//! small reads and writes and measured itself (runc's side streamed 2.8
//! MiB/s through it); iperf3 would need its shared libraries copied into the
//! busybox root, and has no request/response mode.
//!
//! - `netprobe sink PORT`: takes connections one after another and reads
//!   each to its end, discarding the bytes.
//! - `netprobe send ADDR:PORT BYTES`: connects and writes BYTES in 64 KiB
//!   writes, then waits for the far end to close.
//! - `netprobe echo PORT`: on each connection (a thread each), writes back
//!   whatever it reads: a request/response peer (netperf's TCP_RR).
//! - `netprobe work MIB`: writes and sums a fresh MIB-sized buffer four
//!   times and prints the seconds it took: the same CPU and memory work on
//!   both sides, to tell the data paths' cost from how fast the container's
//!   own code runs there.
//! - `netprobe local MIB`: moves MIB through a Unix socket pair between two
//!   threads, in 4 KiB writes, and prints the seconds it took: system calls,
//!   copies and wake-ups in the container's kernel, without a network.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Instant;

/// The size of every read and write: what iperf3 uses for TCP.
const CHUNK: usize = 128 << 10;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["sink", port] => port.parse().map_err(bad_number).and_then(sink),
        ["send", addr, bytes] => bytes
            .parse()
            .map_err(bad_number)
            .and_then(|bytes| send(addr, bytes)),
        ["echo", port] => port.parse().map_err(bad_number).and_then(echo),
        ["work", mib] => mib.parse().map_err(bad_number).map(work),
        ["local", mib] => mib.parse().map_err(bad_number).and_then(local),
        _ => {
            eprintln!(
                "usage: netprobe sink PORT | send ADDR:PORT BYTES | echo PORT | work MIB | \
                 local MIB"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netprobe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bad_number(e: std::num::ParseIntError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
}

fn sink(port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    let mut buf = vec![0u8; CHUNK];
    for conn in listener.incoming() {
        let mut conn = conn?;
        while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
    }
    Ok(())
}

fn send(addr: &str, bytes: u64) -> std::io::Result<()> {
    let mut conn = TcpStream::connect(addr)?;
    let buf = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        conn.write_all(&buf[..n])?;
        left -= n as u64;
    }
    conn.shutdown(Shutdown::Write)?;
    // Until the receiver closes: it has everything then.
    let mut rest = [0u8; 64];
    while conn.read(&mut rest)? > 0 {}
    Ok(())
}

fn echo(port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    for conn in listener.incoming() {
        let mut conn = conn?;
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}

/// Rounds of writing and summing the buffer in [`work`].
const WORK_ROUNDS: usize = 4;

fn work(mib: usize) {
    let started = Instant::now();
    // Fresh pages, so their faults are part of the work, as a socket
    // buffer's are.
    let mut buf = vec![0u8; mib << 20];
    let mut sum = 0u64;
    for round in 0..WORK_ROUNDS {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i ^ round) as u8;
        }
        for word in buf.chunks_exact(8) {
            let word = u64::from_le_bytes(word.try_into().expect("8-byte chunks"));
            sum = sum.rotate_left(5) ^ word;
        }
    }
    std::hint::black_box(sum);
    println!("{:.6}", started.elapsed().as_secs_f64());
}

fn local(mib: usize) -> std::io::Result<()> {
    let (mut tx, mut rx) = UnixStream::pair()?;
    let started = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0usize;
        loop {
            match rx.read(&mut buf) {
                Ok(0) => return Ok(got),
                Ok(n) => got += n,
                Err(e) => return Err(e),
            }
        }
    });
    let page = [1u8; 4096];
    for _ in 0..(mib << 20) / page.len() {
        tx.write_all(&page)?;
    }
    drop(tx);
    let got = reader
        .join()
        .map_err(|_| std::io::Error::other("the reader thread panicked"))??;
    if got != mib << 20 {
        return Err(std::io::Error::other(format!(
            "read {got} of {} bytes",
            mib << 20
        )));
    }
    println!("{:.6}", started.elapsed().as_secs_f64());
    Ok(())
}
