"""The Streamlit operator dashboard (talks to Redis through pipeline clients, never to engine internals)."""
