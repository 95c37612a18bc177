//! The one check of a `host:port` setting (listen, advertised and peer
//! addresses), so every binary refuses a malformed one the same way,
//! before it tries to bind or connect.

/// Checks that `addr` is `host:port`: a host (a name, an IPv4 address or
/// a bracketed IPv6 one) and a port number. `any_port` allows port 0 (a
/// listen address: the system picks a free port).
///
/// # Errors
/// A message naming the address and showing the form.
pub fn check_host_port(addr: &str, any_port: bool) -> Result<(), String> {
    let ok = addr
        .rsplit_once(':')
        .map(|(host, port)| (host.trim_start_matches('[').trim_end_matches(']'), port))
        .is_some_and(|(host, port)| {
            !host.is_empty()
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| any_port || p > 0)
        });
    if ok {
        Ok(())
    } else {
        Err(format!("'{addr}' is not host:port (127.0.0.1:9876, say)"))
    }
}

#[cfg(test)]
mod tests {
    use super::check_host_port;

    #[test]
    fn host_and_port_or_a_message_naming_the_address() {
        for ok in [
            "127.0.0.1:9876",
            "localhost:1",
            "[::1]:10911",
            "broker-a.example:443",
        ] {
            assert_eq!(check_host_port(ok, false), Ok(()), "{ok}");
        }
        assert_eq!(check_host_port("127.0.0.1:0", true), Ok(()));
        for bad in [
            "",
            "bad",
            ":9876",
            "host:",
            "host:port",
            "host:70000",
            "a b:1",
            "127.0.0.1:0",
        ] {
            let err = check_host_port(bad, false).unwrap_err();
            assert!(
                err.contains(&format!("'{bad}'")) && err.contains("host:port"),
                "{err}"
            );
        }
    }
}
