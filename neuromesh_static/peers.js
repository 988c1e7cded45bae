// Minimal page: this node and its peers, refreshed every few seconds.
"use strict";
async function refresh() {
  const [health, peers] = await Promise.all([
    fetch("/api/health").then((r) => r.json()),
    fetch("/api/peers").then((r) => r.json()),
  ]);
  document.getElementById("me").textContent =
    health.name + " — " + health.peer_count + " peer(s) linked";
  const list = document.getElementById("peers");
  list.replaceChildren(...peers.map((peer) => {
    const item = document.createElement("li");
    item.textContent = peer.name + " (" + peer.address + ") " + (peer.connected ? "linked" : "offline");
    return item;
  }));
}
refresh();
setInterval(refresh, 3000);
