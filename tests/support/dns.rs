//! A DNS responder on loopback (UDP), so that tests exercise the proxy's real resolver:
//! A and AAAA answers from a table, NXDOMAIN for names it does not know, and a log of
//! every question asked.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

/// A running responder and the questions it has been asked (name, type).
pub struct Dns {
    pub addr: SocketAddr,
    pub asked: Arc<Mutex<Vec<(String, u16)>>>,
}

impl Dns {
    /// How many questions of any type named `name`.
    pub fn asked_for(&self, name: &str) -> usize {
        self.asked_type(name, None)
    }

    /// How many questions named `name`, of one type (1 = A, 28 = AAAA) or any.
    pub fn asked_type(&self, name: &str, qtype: Option<u16>) -> usize {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, t)| n == name && qtype.is_none_or(|q| q == *t))
            .count()
    }
}

/// Start a responder for `records` (name without the final dot → addresses).
pub async fn responder(records: &[(&str, &[IpAddr])]) -> Dns {
    let table: HashMap<String, Vec<IpAddr>> = records
        .iter()
        .map(|(n, a)| (n.to_ascii_lowercase(), a.to_vec()))
        .collect();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            if let Some(reply) = answer(&buf[..n], &table, &log) {
                let _ = sock.send_to(&reply, from).await;
            }
        }
    });
    Dns { addr, asked }
}

fn answer(
    q: &[u8],
    table: &HashMap<String, Vec<IpAddr>>,
    log: &Mutex<Vec<(String, u16)>>,
) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question_end = i + 4;
    let name = labels.join(".");
    log.lock().unwrap().push((name.clone(), qtype));
    let found = table.get(&name);
    let answers: Vec<&IpAddr> = found
        .map(|a| {
            a.iter()
                .filter(|ip| (qtype == 1 && ip.is_ipv4()) || (qtype == 28 && ip.is_ipv6()))
                .collect()
        })
        .unwrap_or_default();
    let rcode = if found.is_some() { 0 } else { 3 };
    let mut r = Vec::with_capacity(512);
    r.extend_from_slice(&q[0..2]); // id
    r.extend_from_slice(&[0x81, 0x80 | rcode]); // response, recursion desired + available
    r.extend_from_slice(&[0, 1]); // one question
    r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]); // no authority, no additional records
    r.extend_from_slice(q.get(12..question_end)?);
    for ip in answers {
        r.extend_from_slice(&[0xc0, 12]); // the name, by pointer to the question
        r.extend_from_slice(&qtype.to_be_bytes());
        r.extend_from_slice(&[0, 1]); // class IN
        r.extend_from_slice(&300u32.to_be_bytes()); // TTL
        match ip {
            IpAddr::V4(v4) => {
                r.extend_from_slice(&4u16.to_be_bytes());
                r.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                r.extend_from_slice(&16u16.to_be_bytes());
                r.extend_from_slice(&v6.octets());
            }
        }
    }
    Some(r)
}
