//! A throwaway Redis Cluster: six `redis-server --cluster-enabled yes` on free ports, made
//! into three primaries with a replica each by `redis-cli --cluster create`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{find_binary, free_port, signal_pid};

const NODES: usize = 6;

struct Node {
    port: u16,
    _dir: TempDir,
    child: Option<Child>,
}

/// A node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub primary: bool,
    /// Of a replica: its primary's id.
    pub replicates: Option<String>,
    /// Of a primary: its slot ranges.
    pub slots: Vec<(u16, u16)>,
    pub failed: bool,
}

pub struct RedisCluster {
    nodes: Vec<Node>,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let binary = find_binary("redis-server", "redis-server");
        let mut nodes = Vec::new();
        for _ in 0..NODES {
            let dir = tempfile::Builder::new()
                .prefix("walcast-cluster-")
                .tempdir()
                .unwrap();
            let port = free_port();
            // The bus port explicitly: by default it is the port + 10000, which nobody
            // checked is free.
            let bus = free_port();
            let child = Command::new(&binary)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-port", &bus.to_string()])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server");
            nodes.push(Node {
                port,
                _dir: dir,
                child: Some(child),
            });
        }
        let cluster = RedisCluster { nodes };
        for node in &cluster.nodes {
            let port = node.port;
            super::eventually(
                &format!("redis-server on {port} answering"),
                Duration::from_secs(10),
                || async move { node_conn(port).await.is_ok() },
            )
            .await;
        }
        let cli = find_binary("redis-cli", "redis-tools");
        let out = Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|n| format!("127.0.0.1:{}", n.port)),
            )
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok().await;
        cluster
    }

    /// Until every running node reports `cluster_state:ok` and sees every other one.
    pub async fn wait_ok(&self) {
        let ports: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect();
        super::eventually(
            "the cluster's state ok on every node",
            Duration::from_secs(30),
            || {
                let ports = ports.clone();
                async move {
                    for port in ports {
                        let Ok(info) = info(port, "CLUSTER", "INFO").await else {
                            return false;
                        };
                        if !info.contains("cluster_state:ok") {
                            return false;
                        }
                    }
                    true
                }
            },
        )
        .await;
    }

    /// `WALCAST_REDIS_CLUSTER`: two of the nodes, as a user would give seeds.
    pub fn seeds(&self) -> String {
        format!(
            "redis://127.0.0.1:{},redis://127.0.0.1:{}",
            self.nodes[0].port, self.nodes[1].port
        )
    }

    pub async fn conn(&self) -> redis::cluster_async::ClusterConnection {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect();
        redis::cluster::ClusterClient::new(urls)
            .unwrap()
            .get_async_connection()
            .await
            .expect("connect to the test cluster")
    }

    /// `stats:events` field `field`, 0 when absent.
    pub async fn stat(&self, field: &str) -> i64 {
        let mut conn = self.conn().await;
        redis::cmd("HGET")
            .arg("stats:events")
            .arg(field)
            .query_async::<Option<i64>>(&mut conn)
            .await
            .unwrap()
            .unwrap_or(0)
    }

    pub async fn total(&self) -> i64 {
        self.stat("total").await
    }

    /// The nodes as a running node sees them.
    pub async fn nodes(&self) -> Vec<NodeInfo> {
        let port = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a node running")
            .port;
        let text = info(port, "CLUSTER", "NODES").await.unwrap();
        text.lines()
            .filter(|line| !line.is_empty())
            .map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let port = fields[1]
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
                    .unwrap();
                let flags = fields[2];
                let slots = fields[8..]
                    .iter()
                    .filter(|s| !s.starts_with('['))
                    .map(|s| match s.split_once('-') {
                        Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                        None => (s.parse().unwrap(), s.parse().unwrap()),
                    })
                    .collect();
                NodeInfo {
                    id: fields[0].to_owned(),
                    port,
                    primary: flags.contains("master"),
                    replicates: (fields[3] != "-").then(|| fields[3].to_owned()),
                    slots,
                    failed: flags.contains("fail"),
                }
            })
            .collect()
    }

    /// The primary serving `slot`, and its replica.
    pub async fn shard_of(&self, slot: u16) -> (NodeInfo, NodeInfo) {
        let nodes = self.nodes().await;
        let primary = nodes
            .iter()
            .find(|n| n.primary && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .unwrap_or_else(|| panic!("no primary serves slot {slot}: {nodes:?}"))
            .clone();
        let replica = nodes
            .iter()
            .find(|n| n.replicates.as_deref() == Some(primary.id.as_str()))
            .unwrap_or_else(|| panic!("the primary of slot {slot} has no replica: {nodes:?}"))
            .clone();
        (primary, replica)
    }

    fn node(&mut self, port: u16) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on {port}"))
    }

    /// The process id of the node on `port` (benches/cluster.rs measures its CPU).
    #[allow(dead_code)]
    pub fn pid(&self, port: u16) -> u32 {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .and_then(|n| n.child.as_ref())
            .unwrap_or_else(|| panic!("no node running on {port}"))
            .id()
    }

    pub fn signal(&mut self, port: u16, sig: i32) {
        let child = self.node(port).child.as_ref().expect("node running");
        signal_pid(child.id(), sig);
    }

    pub fn kill(&mut self, port: u16) {
        if let Some(mut child) = self.node(port).child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Moves `slot` from primary `from` to primary `to` as a resharding does (what
    /// `redis-cli --cluster reshard` runs for each slot): the slot marked migrating and
    /// importing, its keys moved with `MIGRATE` a few at a time while clients keep writing
    /// (they meet `ASK` and `TRYAGAIN`), then given to `to` on every primary (`MOVED`).
    pub async fn move_slot(&self, slot: u16, from: &NodeInfo, to: &NodeInfo) {
        let setslot = |state: &str, id: &str| {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(id)
                .to_owned()
        };
        self.on_node(to.port, &setslot("IMPORTING", &from.id))
            .await
            .unwrap();
        self.on_node(from.port, &setslot("MIGRATING", &to.id))
            .await
            .unwrap();
        loop {
            let mut conn = node_conn(from.port).await.unwrap();
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(1)
                .query_async(&mut conn)
                .await
                .unwrap();
            if keys.is_empty() {
                break;
            }
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to.port)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await
                .unwrap();
            // Let writers meet the slot half moved.
            tokio::task::yield_now().await;
        }
        for node in self.nodes().await.iter().filter(|n| n.primary && !n.failed) {
            self.on_node(node.port, &setslot("NODE", &to.id))
                .await
                .unwrap();
        }
        self.wait_ok().await;
    }

    /// A command to one node, on a connection of its own.
    pub async fn on_node(&self, port: u16, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
        let mut conn = node_conn(port).await?;
        cmd.query_async(&mut conn).await
    }

    /// Keys of every primary matching `pattern`, summed.
    pub async fn count_keys(&self, pattern: &str) -> usize {
        let mut total = 0;
        for node in self.nodes().await.iter().filter(|n| n.primary && !n.failed) {
            let mut conn = node_conn(node.port).await.unwrap();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(pattern)
                .query_async(&mut conn)
                .await
                .unwrap();
            total += keys.len();
        }
        total
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

async fn node_conn(port: u16) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(deadline - Instant::now()))
        .set_response_timeout(Some(Duration::from_secs(5)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

async fn info(port: u16, cmd: &str, arg: &str) -> redis::RedisResult<String> {
    let mut conn = node_conn(port).await?;
    redis::cmd(cmd).arg(arg).query_async(&mut conn).await
}
