"""The dashboard pages; each file is a Streamlit page script that `ui/app.py` registers with st.navigation."""
